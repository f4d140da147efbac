//! The rendezvous protocol on loopback, with ranks as separate processes (this test
//! binary re-run as a child that joins) and as threads.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ep_core::EpError;
use ep_mesh::rendezvous::{exchange_payload, join, RendezvousConfig, RendezvousHost};
use ep_mesh::Launch;

const PAYLOAD: &[u8] = b"\x00\x01nccl-unique-id\xff";

fn host(world: usize, timeout: Duration) -> (RendezvousHost, SocketAddr) {
    let host = RendezvousHost::bind("127.0.0.1:0".parse().unwrap(), world, timeout).unwrap();
    let addr = host.local_addr();
    (host, addr)
}

/// Starts this test binary as a process that joins as `rank` of `world`.
fn spawn_rank(addr: SocketAddr, rank: usize, world: usize) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_rank",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("MASTER_ADDR", addr.ip().to_string())
        .env("MASTER_PORT", addr.port().to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("RANK", rank.to_string())
        // Quiet: the child is judged by its exit status, and its own test-runner
        // lines (a failure is expected in the timeout test) must not mix with ours.
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// The child side: joins from the environment, succeeds only with the payload.
#[test]
#[ignore]
fn child_rank() {
    let config = RendezvousConfig::from_env(Duration::from_secs(20)).expect("torchrun variables");
    assert_eq!(join(&config).expect("rendezvous"), PAYLOAD);
}

#[test]
fn every_process_gets_the_payload() {
    let (host, addr) = host(4, Duration::from_secs(30));
    let children: Vec<Child> = (1..4).map(|r| spawn_rank(addr, r, 4)).collect();
    let served = std::thread::spawn(move || host.serve(PAYLOAD));
    let own = RendezvousConfig {
        addr,
        world_size: 4,
        rank: 0,
        timeout: Duration::from_secs(30),
    };
    assert_eq!(join(&own).unwrap(), PAYLOAD);
    served.join().unwrap().unwrap();
    for mut child in children {
        assert!(child.wait().unwrap().success());
    }
}

#[test]
fn a_process_that_never_arrives_times_out_by_name() {
    let timeout = Duration::from_millis(1500);
    let (host, addr) = host(3, timeout);
    let mut child = spawn_rank(addr, 1, 3); // rank 2 never comes
    let start = Instant::now();
    let err = host.serve(PAYLOAD).unwrap_err();
    assert_eq!(
        err,
        EpError::Timeout {
            rank: 0,
            waiting_for: vec![0, 2],
            after: timeout
        }
    );
    assert!(start.elapsed() < Duration::from_secs(15));
    assert!(
        !child.wait().unwrap().success(),
        "the waiting rank fails too"
    );
    assert!(err.to_string().contains("[0, 2]"), "{err}");
}

/// A port nobody listens on (bound, then released).
fn free_addr() -> SocketAddr {
    host(1, Duration::from_secs(1)).1
}

/// Process 0's whole part: it makes the payload, hosts on every interface at the
/// configured port, and joins; the other processes only join.
#[test]
fn process_zero_hosts_and_hands_out_what_it_made() {
    let addr = free_addr();
    let children: Vec<Child> = (1..3).map(|r| spawn_rank(addr, r, 3)).collect();
    let own = RendezvousConfig {
        addr,
        world_size: 3,
        rank: 0,
        timeout: Duration::from_secs(30),
    };
    assert_eq!(
        exchange_payload(&own, || Ok(PAYLOAD.to_vec())).unwrap(),
        PAYLOAD
    );
    for mut child in children {
        assert!(child.wait().unwrap().success());
    }
}

/// When a process never arrives, process 0's error is the host's, naming it.
#[test]
fn process_zero_names_who_never_arrived() {
    let addr = free_addr();
    let timeout = Duration::from_secs(3);
    let mut child = spawn_rank(addr, 2, 4); // ranks 1 and 3 never come
    let own = RendezvousConfig {
        addr,
        world_size: 4,
        rank: 0,
        timeout,
    };
    let err = exchange_payload(&own, || Ok(PAYLOAD.to_vec())).unwrap_err();
    assert_eq!(
        err,
        EpError::Timeout {
            rank: 0,
            waiting_for: vec![1, 3],
            after: timeout
        }
    );
    assert!(
        !child.wait().unwrap().success(),
        "the waiting rank fails too"
    );
}

#[test]
fn a_wrong_world_size_is_refused_by_name() {
    let (host, addr) = host(3, Duration::from_secs(10));
    let served = std::thread::spawn(move || host.serve(PAYLOAD));
    let wrong = RendezvousConfig {
        addr,
        world_size: 4,
        rank: 1,
        timeout: Duration::from_secs(10),
    };
    let err = join(&wrong).unwrap_err();
    assert!(
        matches!(&err, EpError::PeerFailed { reason, .. } if reason.contains("world size 4")),
        "{err:?}"
    );
    let host_err = served.join().unwrap().unwrap_err();
    assert!(
        matches!(&host_err, EpError::InvalidConfig(m) if m.contains("rank 1 joined with world size 4")),
        "{host_err:?}"
    );
}

#[test]
fn joining_without_a_host_times_out() {
    let addr = free_addr();
    let config = RendezvousConfig {
        addr,
        world_size: 2,
        rank: 1,
        timeout: Duration::from_millis(400),
    };
    let start = Instant::now();
    assert!(matches!(
        join(&config),
        Err(EpError::Timeout { rank: 1, .. })
    ));
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn the_environment_is_read_in_the_torchrun_convention() {
    // The variables as the environment would give them (`Launch::from_env` reads
    // the process's own), without setting any in a multi-threaded harness.
    let vars = |rank: &'static str| {
        move |name: &str| {
            let value = match name {
                "MASTER_ADDR" => "127.0.0.1",
                "MASTER_PORT" => "29500",
                "WORLD_SIZE" => "2",
                "RANK" => rank,
                _ => return None,
            };
            Some(value.to_string())
        }
    };
    let timeout = Duration::from_secs(1);
    let err = Launch::from_vars(vars("5"), timeout, 1).unwrap_err();
    assert!(matches!(err, EpError::InvalidConfig(m) if m.contains("RANK 5")));
    let config = Launch::from_vars(vars("1"), timeout, 1).unwrap().rendezvous;
    assert_eq!(
        (config.rank, config.world_size, config.addr.port()),
        (1, 2, 29500)
    );
}
