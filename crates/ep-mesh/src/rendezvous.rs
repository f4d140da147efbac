//! The TCP rendezvous of multi-process start-up, in the torchrun convention
//! (`MASTER_ADDR`, `MASTER_PORT`, `WORLD_SIZE`, `RANK`): rank 0 hosts, every rank
//! (rank 0 too) joins, and once all have joined the host hands every rank the same
//! payload (for NCCL: the communicator's unique id). Nothing waits forever: a
//! rendezvous that does not complete within its timeout fails on every rank, and the
//! host's error names the ranks that never arrived.
//!
//! Protocol, one line each way: a rank sends `JOIN <rank> <world>`; the host answers
//! `OK <payload as hex>` once all ranks are in, or `ERR <reason>`.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use ep_core::{EpError, EpResult};

/// Where and how big: read from the environment or given directly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RendezvousConfig {
    pub addr: SocketAddr,
    pub world_size: usize,
    pub rank: usize,
    pub timeout: Duration,
}

impl RendezvousConfig {
    /// From `MASTER_ADDR`, `MASTER_PORT`, `WORLD_SIZE` and `RANK` (or `NNODES` and
    /// `NODE_RANK`): the rendezvous of a [`Launch`](crate::Launch), whose processes
    /// are the ranks here.
    pub fn from_env(timeout: Duration) -> EpResult<Self> {
        crate::Launch::from_env(timeout, 1).map(|launch| launch.rendezvous)
    }

    /// The address of `host:port`, or an error naming what does not resolve.
    pub fn resolve(host: &str, port: usize) -> EpResult<SocketAddr> {
        let port = u16::try_from(port)
            .map_err(|_| EpError::InvalidConfig(format!("MASTER_PORT {port} is not a port")))?;
        (host, port)
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| {
                EpError::InvalidConfig(format!("MASTER_ADDR {host}:{port} does not resolve"))
            })
    }
}

/// The whole rendezvous for one process: rank 0 makes the payload with `make` and
/// hosts (on every interface, at the configured port) while joining like everyone
/// else; every rank returns the payload. On rank 0 a failed rendezvous returns the
/// host's error, which names the ranks that never arrived.
pub fn exchange_payload(
    config: &RendezvousConfig,
    make: impl FnOnce() -> EpResult<Vec<u8>>,
) -> EpResult<Vec<u8>> {
    if config.rank != 0 {
        return join(config);
    }
    let payload = make()?;
    let any: SocketAddr = match config.addr {
        SocketAddr::V4(_) => ([0, 0, 0, 0], config.addr.port()).into(),
        SocketAddr::V6(_) => ([0u16; 8], config.addr.port()).into(),
    };
    let host = RendezvousHost::bind(any, config.world_size, config.timeout)?;
    let served = std::thread::spawn(move || host.serve(&payload));
    let joined = join(config);
    let served = served.join().unwrap_or_else(|_| {
        Err(EpError::Transport(
            "rendezvous: the host thread panicked".into(),
        ))
    });
    served.and(joined)
}

fn io_error(what: &str, e: std::io::Error) -> EpError {
    EpError::Transport(format!("rendezvous: {what}: {e}"))
}

/// The host side, run by rank 0 beside its own `join`: accepts one `JOIN` from
/// every rank, then answers all of them with `payload`.
pub struct RendezvousHost {
    listener: TcpListener,
    world_size: usize,
    timeout: Duration,
}

impl RendezvousHost {
    /// Binds `addr` (port 0 picks a free port: see [`RendezvousHost::local_addr`]).
    pub fn bind(addr: SocketAddr, world_size: usize, timeout: Duration) -> EpResult<Self> {
        let listener = TcpListener::bind(addr).map_err(|e| io_error(&format!("bind {addr}"), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| io_error("set_nonblocking", e))?;
        Ok(Self {
            listener,
            world_size,
            timeout,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Waits for every rank, then sends each the payload. Fails naming the missing
    /// ranks on timeout, or naming the rank whose world size or rank is wrong; the
    /// ranks already in are told why.
    pub fn serve(self, payload: &[u8]) -> EpResult<()> {
        let deadline = Instant::now() + self.timeout;
        let mut joined: Vec<Option<TcpStream>> = (0..self.world_size).map(|_| None).collect();
        let fail = |joined: &mut Vec<Option<TcpStream>>, error: EpError| {
            for stream in joined.iter_mut().flatten() {
                let _ = writeln!(stream, "ERR {error}");
            }
            Err(error)
        };
        while joined.iter().any(Option::is_none) {
            if Instant::now() >= deadline {
                let missing: Vec<usize> = (0..self.world_size)
                    .filter(|&r| joined[r].is_none())
                    .collect();
                let error = EpError::Timeout {
                    rank: 0,
                    waiting_for: missing,
                    after: self.timeout,
                };
                return fail(&mut joined, error);
            }
            let mut stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(e) => return fail(&mut joined, io_error("accept", e)),
            };
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_read_timeout(Some(
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            ));
            let mut line = String::new();
            if BufReader::new(&stream).read_line(&mut line).is_err() {
                continue; // a connection that says nothing is not a rank
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            let parsed = match words.as_slice() {
                ["JOIN", rank, world] => {
                    rank.parse::<usize>().ok().zip(world.parse::<usize>().ok())
                }
                _ => None,
            };
            let Some((rank, world)) = parsed else {
                let _ = writeln!(stream, "ERR malformed join: {}", line.trim());
                continue;
            };
            let error = if world != self.world_size {
                Some(EpError::InvalidConfig(format!(
                    "rank {rank} joined with world size {world}, the host has {}",
                    self.world_size
                )))
            } else if rank >= self.world_size {
                Some(EpError::InvalidConfig(format!(
                    "rank {rank} is outside a world of {world}"
                )))
            } else if joined[rank].is_some() {
                Some(EpError::InvalidConfig(format!("rank {rank} joined twice")))
            } else {
                None
            };
            if let Some(error) = error {
                let _ = writeln!(stream, "ERR {error}");
                return fail(&mut joined, error);
            }
            joined[rank] = Some(stream);
        }
        let hex: String = payload.iter().map(|b| format!("{b:02x}")).collect();
        for stream in joined.iter_mut().flatten() {
            writeln!(stream, "OK {hex}").map_err(|e| io_error("answer", e))?;
        }
        Ok(())
    }
}

/// Joins the rendezvous at `config.addr` (retrying until the host listens) and
/// returns the host's payload.
pub fn join(config: &RendezvousConfig) -> EpResult<Vec<u8>> {
    let deadline = Instant::now() + config.timeout;
    let timed_out = || EpError::Timeout {
        rank: config.rank,
        waiting_for: vec![0],
        after: config.timeout,
    };
    let mut stream = loop {
        match TcpStream::connect_timeout(&config.addr, Duration::from_millis(200)) {
            Ok(stream) => break stream,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => return Err(timed_out()),
        }
    };
    writeln!(stream, "JOIN {} {}", config.rank, config.world_size)
        .map_err(|e| io_error("join", e))?;
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    stream
        .set_read_timeout(Some(left))
        .map_err(|e| io_error("set_read_timeout", e))?;
    let mut line = String::new();
    match BufReader::new(&stream).read_line(&mut line) {
        Ok(0) => Err(EpError::PeerFailed {
            rank: 0,
            reason: "the rendezvous host closed the connection".into(),
        }),
        Ok(_) => {
            let line = line.trim();
            if let Some(hex) = line.strip_prefix("OK ").or((line == "OK").then_some("")) {
                (0..hex.len() / 2)
                    .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16))
                    .collect::<Result<_, _>>()
                    .map_err(|_| EpError::Transport(format!("rendezvous: bad payload {hex}")))
            } else {
                Err(EpError::PeerFailed {
                    rank: 0,
                    reason: format!(
                        "rendezvous refused: {}",
                        line.strip_prefix("ERR ").unwrap_or(line)
                    ),
                })
            }
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Err(timed_out())
        }
        Err(e) => Err(io_error("read answer", e)),
    }
}
