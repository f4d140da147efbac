//! The all-to-all-v of row segments, as the ops see it: a send buffer goes out in
//! per-rank segments, the received rows come back in source-rank order. Forward
//! passes and backward passes call it alike, so it lives in [`SharedExchange`], which
//! routing handles and backward states hold.
//!
//! Every exchange is checked before anything moves: each rank tells each peer which
//! handle and operation it is making (an [`ExchangeTag`]) and how many rows it will
//! send, and the peer compares that with its own call. Two ranks that reach
//! different collectives at the same point get [`EpError::ExchangeMismatch`], never
//! rows of another route.

use std::fmt;
use std::sync::{Arc, OnceLock};

use burn::tensor::backend::{Backend, ExecutionError};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Int, Tensor, TensorData};
use ep_core::{counters, EpError, EpResult};
use ep_mesh::{Control, DeviceExchange, LocalComm, Pairing, Plane};

use crate::backend::{float, int, upload, RecordRows};
use crate::order::BackwardOrder;
use crate::transfer::{concat_rows, split_rows};

/// Moves rows between the ranks of a group.
pub trait RowExchange: Send + Sync {
    /// `planes` are the send buffers, each with `send_counts[d]` rows for rank `d`
    /// in rank order (`None` when nothing is sent). Returns, plane by plane, what
    /// the other ranks sent here, concatenated in source-rank order (`None` when
    /// nothing came).
    fn exchange_rows(
        &self,
        planes: Option<Vec<TensorData>>,
        send_counts: &[usize],
    ) -> EpResult<Option<Vec<TensorData>>>;

    /// The device path, for transports that move device buffers themselves (the
    /// cuda-peer transport); `None` when rows travel as host data.
    fn device(&self) -> Option<&dyn DeviceExchange> {
        None
    }
}

/// The local transport moves host copies (see `transfer`).
impl RowExchange for LocalComm {
    fn exchange_rows(
        &self,
        planes: Option<Vec<TensorData>>,
        send_counts: &[usize],
    ) -> EpResult<Option<Vec<TensorData>>> {
        let world = self.world_size();
        // One message per destination: its rows of every plane.
        let mut messages: Vec<Option<Vec<TensorData>>> = vec![None; world];
        for plane in planes.iter().flatten() {
            for (message, block) in messages.iter_mut().zip(split_rows(plane, send_counts)) {
                if let Some(block) = block {
                    message.get_or_insert_with(Vec::new).push(block);
                }
            }
        }
        let received: Vec<Vec<TensorData>> =
            self.all_to_all(messages)?.into_iter().flatten().collect();
        let Some(plane_count) = received.first().map(Vec::len) else {
            return Ok(None);
        };
        let mut sources: Vec<_> = received.into_iter().map(Vec::into_iter).collect();
        Ok((0..plane_count)
            .map(|_| concat_rows(sources.iter_mut().filter_map(Iterator::next).collect()))
            .collect())
    }
}

#[cfg(feature = "cuda")]
impl RowExchange for ep_mesh::CudaPeerComm {
    /// Host data (routing metadata on backends without the device path) goes through
    /// the control channel.
    fn exchange_rows(
        &self,
        planes: Option<Vec<TensorData>>,
        send_counts: &[usize],
    ) -> EpResult<Option<Vec<TensorData>>> {
        self.control().exchange_rows(planes, send_counts)
    }

    fn device(&self) -> Option<&dyn DeviceExchange> {
        Some(self)
    }
}

/// Transports across processes move CUDA device memory only: a backend whose rows
/// are host data has no path there, and is told so instead of being served slowly.
#[cfg(feature = "cuda")]
macro_rules! device_only_exchange {
    ($($transport:ty),*) => {$(
        impl RowExchange for $transport {
            fn exchange_rows(
                &self,
                _planes: Option<Vec<TensorData>>,
                _send_counts: &[usize],
            ) -> EpResult<Option<Vec<TensorData>>> {
                Err(ep_core::EpError::Transport(
                    "the nccl and hierarchical transports move CUDA device memory, but this \
                     backend's rows are host data (use the Cuda backend, or the local or \
                     cuda-peer transport)"
                        .into(),
                ))
            }

            fn device(&self) -> Option<&dyn DeviceExchange> {
                Some(self)
            }
        }
    )*};
}

#[cfg(feature = "cuda")]
device_only_exchange!(ep_mesh::NcclComm, ep_mesh::HierarchicalComm);

/// Which collective an exchange belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum ExchangeOp {
    /// The count exchange of a recording dispatch.
    Counts = 1,
    /// The rows of a recording dispatch, with their weights and expert ids.
    Record,
    /// The payload rows of a cached dispatch.
    Rows,
    /// The reduced rows of a combine, going back.
    Combine,
    /// The backward of a dispatch's rows (an unweighted combine of the gradient).
    RowsGrad,
    /// The backward of the weights' route (the gradient returns).
    WeightsGrad,
    /// The backward of a combine (a dispatch of the gradient).
    CombineGrad,
    /// A group barrier.
    Barrier,
    /// A group all-reduce.
    AllReduce,
}

impl ExchangeOp {
    const ALL: [ExchangeOp; 9] = [
        Self::Counts,
        Self::Record,
        Self::Rows,
        Self::Combine,
        Self::RowsGrad,
        Self::WeightsGrad,
        Self::CombineGrad,
        Self::Barrier,
        Self::AllReduce,
    ];

    fn from_word(word: u64) -> Option<Self> {
        Self::ALL.into_iter().find(|op| *op as u64 == word)
    }

    fn name(self) -> &'static str {
        match self {
            Self::Counts => "the count exchange of dispatch",
            Self::Record => "the rows of dispatch",
            Self::Rows => "the rows of a cached dispatch",
            Self::Combine => "combine",
            Self::RowsGrad => "the backward of dispatch",
            Self::WeightsGrad => "the backward of the weights' dispatch",
            Self::CombineGrad => "the backward of combine",
            Self::Barrier => "a barrier",
            Self::AllReduce => "an all-reduce",
        }
    }
}

/// The identity of one exchange: the routing handle (numbered by the group, in the
/// order of recording dispatches, so equal on every rank) and the operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExchangeTag {
    /// The routing handle's number in its group.
    pub handle: u64,
    /// Which operation of the handle the exchange serves.
    pub op: ExchangeOp,
}

impl ExchangeTag {
    /// The tag of operation `op` on handle `handle`.
    pub fn new(handle: u64, op: ExchangeOp) -> Self {
        Self { handle, op }
    }
}

impl fmt::Display for ExchangeTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.op {
            ExchangeOp::Barrier | ExchangeOp::AllReduce => f.write_str(self.op.name()),
            op => write!(f, "{} (handle {})", op.name(), self.handle),
        }
    }
}

/// What a peer said it was doing, for the error message.
fn describe(words: &[u64]) -> String {
    match ExchangeOp::from_word(words[1]) {
        Some(op) => format!("{} with {} rows", ExchangeTag::new(words[0], op), words[2]),
        None => format!("an unknown message {words:?}"),
    }
}

/// A group's transports, as routing handles and backward passes hold them: the
/// control channel (counts, checks), the row transport, and the order in which the
/// group's differentiable operations run backward.
#[derive(Clone)]
pub struct SharedExchange(Arc<Link>);

struct Link {
    control: Arc<dyn Control>,
    rows: Arc<dyn RowExchange>,
    /// The length of every call's opening message (see [`Pairing`]).
    opening_words: usize,
    order: BackwardOrder,
    /// Set when this rank's device failed: every later call ends with it.
    fault: OnceLock<EpError>,
}

impl SharedExchange {
    /// A group's transports; every call opens with a message of `opening_words`
    /// words (see [`Pairing`]), enough for the longest opening the group makes.
    pub(crate) fn new(
        control: Arc<dyn Control>,
        rows: Arc<dyn RowExchange>,
        opening_words: usize,
    ) -> Self {
        Self(Arc::new(Link {
            control,
            rows,
            opening_words,
            order: BackwardOrder::default(),
            fault: OnceLock::new(),
        }))
    }

    /// Ends this rank's part in the group because its device failed (`reason` is
    /// the driver's word): the peers are told at once, and this call and every later
    /// one on this rank return the error.
    pub(crate) fn device_failed(&self, reason: impl fmt::Display) -> EpError {
        let control = self.control();
        self.0
            .fault
            .get_or_init(|| {
                let reason = one_line(&reason.to_string());
                control.leave(&format!("its device failed: {reason}"));
                EpError::DeviceFailed {
                    rank: control.rank(),
                    reason,
                }
            })
            .clone()
    }

    /// The device failure that ended this rank's part, if there was one.
    pub(crate) fn check_healthy(&self) -> EpResult<()> {
        match self.0.fault.get() {
            Some(error) => Err(error.clone()),
            None => Ok(()),
        }
    }

    pub(crate) fn control(&self) -> &dyn Control {
        self.0.control.as_ref()
    }

    pub(crate) fn order(&self) -> &BackwardOrder {
        &self.0.order
    }

    /// Whether rows move between device buffers (CUDA transports) rather than as
    /// host data.
    pub fn has_device_path(&self) -> bool {
        self.0.rows.device().is_some()
    }

    /// Whether a rank's kernels place its own rows in its receive buffers, so the
    /// device transport moves only the rows between distinct ranks (unless the
    /// transport asks to move them itself, see [`DeviceExchange::moves_own_rows`]).
    pub(crate) fn places_own_rows(&self) -> bool {
        self.0.rows.device().is_some_and(|d| !d.moves_own_rows())
    }

    /// Tells every peer what this rank is about to exchange and checks that each
    /// peer is making the same exchange, with the row count this rank expects from
    /// it. Nothing has moved when this fails.
    pub fn check_pairing(
        &self,
        tag: ExchangeTag,
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> EpResult<()> {
        self.check_healthy()?;
        ep_mesh::check_pairing(self.control(), &self.pairing(tag, send_counts, recv_counts))
    }

    /// The pairing check of a call of this group.
    pub(crate) fn pairing<'a>(
        &self,
        tag: ExchangeTag,
        send_counts: &'a [usize],
        recv_counts: &'a [usize],
    ) -> TagPairing<'a> {
        TagPairing {
            rank: self.control().rank(),
            message_words: self.0.opening_words,
            tag,
            send_counts,
            recv_counts,
        }
    }

    /// The checked host path: `planes` (`send_counts` rows per rank each) out, what
    /// came in, plane by plane.
    pub fn exchange_rows(
        &self,
        tag: ExchangeTag,
        planes: Option<Vec<TensorData>>,
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> EpResult<Option<Vec<TensorData>>> {
        self.check_pairing(tag, send_counts, recv_counts)?;
        counters::exchange();
        self.0.rows.exchange_rows(planes, send_counts)
    }

    /// The checked device path (see [`DeviceExchange::all_to_all_v`]): the
    /// transport checks the pairing, in its first message where it has one, and
    /// orders the exchange on `stream`. With `local_placed` this rank's own rows
    /// are already in its receive buffers and do not move.
    pub fn device_all_to_all(
        &self,
        tag: ExchangeTag,
        planes: &[Plane],
        send_counts: &[usize],
        recv_counts: &[usize],
        local_placed: bool,
        stream: u64,
    ) -> EpResult<()> {
        let transport = self.device_transport()?;
        self.check_healthy()?;
        let pairing = self.pairing(tag, send_counts, recv_counts);
        counters::exchange();
        transport.all_to_all_v(
            planes,
            send_counts,
            recv_counts,
            local_placed,
            &pairing,
            stream,
        )
    }

    /// Whether this rank's kernels can reach into its peers' buffers (see
    /// [`ep_mesh::DirectAccess`]).
    pub(crate) fn has_direct_access(&self) -> bool {
        self.0.rows.device().is_some_and(|d| d.direct().is_some())
    }

    /// The checked direct path (see [`ep_mesh::DirectAccess::direct_call`]): the
    /// pairing is checked in the message that carries `offer`; `kernels` may touch
    /// the offered buffers of the peers in `reach`, and the peers in `reached_by`
    /// touch this rank's.
    pub(crate) fn direct_call(
        &self,
        tag: ExchangeTag,
        (send_counts, recv_counts): (&[usize], &[usize]),
        offer: Vec<Vec<u64>>,
        (reach, reached_by): (&[bool], &[bool]),
        stream: u64,
        kernels: &mut dyn FnMut(&[Vec<u64>]) -> EpResult<()>,
    ) -> EpResult<()> {
        let direct = self.device_transport()?.direct().ok_or_else(|| {
            EpError::Transport("this transport gives kernels no access to peers' buffers".into())
        })?;
        self.check_healthy()?;
        let pairing = self.pairing(tag, send_counts, recv_counts);
        counters::exchange();
        direct.direct_call(offer, reach, reached_by, &pairing, stream, kernels)
    }

    fn device_transport(&self) -> EpResult<&dyn DeviceExchange> {
        self.0
            .rows
            .device()
            .ok_or_else(|| EpError::Transport("this transport has no device path for rows".into()))
    }
}

/// The pairing check of one exchange: each rank tells each peer the tag and the
/// rows it sends there; the peer expects its own tag and the rows it receives.
pub(crate) struct TagPairing<'a> {
    rank: usize,
    message_words: usize,
    tag: ExchangeTag,
    send_counts: &'a [usize],
    recv_counts: &'a [usize],
}

impl Pairing for TagPairing<'_> {
    fn message_words(&self) -> usize {
        self.message_words
    }

    fn words_for(&self, peer: usize) -> [u64; 3] {
        [
            self.tag.handle,
            self.tag.op as u64,
            self.send_counts[peer] as u64,
        ]
    }

    fn check(&self, peer: usize, words: [u64; 3]) -> EpResult<()> {
        let expected_rows = self.recv_counts[peer];
        if words == [self.tag.handle, self.tag.op as u64, expected_rows as u64] {
            return Ok(());
        }
        Err(EpError::ExchangeMismatch {
            rank: self.rank,
            peer,
            expected: format!("{} with {expected_rows} rows", self.tag),
            got: describe(&words),
        })
    }
}

/// The host path of a float exchange: read the send buffer, move host data, upload
/// what came.
pub(crate) fn host_exchange<B: Backend>(
    tag: ExchangeTag,
    rows: Option<FloatTensor<B>>,
    dtype: DType,
    send_counts: &[usize],
    recv_counts: &[usize],
    device: &B::Device,
    exchange: &SharedExchange,
) -> EpResult<Option<FloatTensor<B>>> {
    let data = rows
        .map(|r| read_rows(float::<B, 2>(r).try_into_data(), exchange))
        .transpose()?;
    Ok(exchange
        .exchange_rows(tag, data.map(|d| vec![d]), send_counts, recv_counts)?
        .and_then(|planes| planes.into_iter().next())
        .map(|d| upload::<B>(d, device, dtype)))
}

/// The host path of a recording dispatch's exchange: the rows, weights and expert
/// ids read back and moved as one exchange of three planes.
pub(crate) fn host_exchange_record<B: Backend>(
    tag: ExchangeTag,
    sent: Option<RecordRows<B>>,
    dtypes: [DType; 2],
    send_counts: &[usize],
    recv_counts: &[usize],
    device: &B::Device,
    exchange: &SharedExchange,
) -> EpResult<Option<RecordRows<B>>> {
    let planes = sent
        .map(|sent| {
            Ok::<_, EpError>(vec![
                read_rows(float::<B, 2>(sent.rows).try_into_data(), exchange)?,
                read_rows(float::<B, 2>(sent.weights).try_into_data(), exchange)?,
                read_rows(int::<B, 2>(sent.expert_ids).try_into_data(), exchange)?,
            ])
        })
        .transpose()?;
    let Some(received) = exchange.exchange_rows(tag, planes, send_counts, recv_counts)? else {
        return Ok(None);
    };
    let [rows, weights, expert_ids]: [TensorData; 3] = received
        .try_into()
        .map_err(|_| EpError::Transport("a recording exchange came without its 3 planes".into()))?;
    Ok(Some(RecordRows {
        rows: upload::<B>(rows, device, dtypes[0]),
        weights: upload::<B>(weights, device, dtypes[1]),
        expert_ids: Tensor::<B, 2, Int>::from_data(expert_ids, device).into_primitive(),
    }))
}

/// The send buffer read back for the host path; a read that fails is the device's
/// failure.
fn read_rows(
    data: Result<TensorData, ExecutionError>,
    exchange: &SharedExchange,
) -> EpResult<TensorData> {
    counters::host_sync();
    data.map_err(|e| exchange.device_failed(format_args!("reading rows to send failed: {e}")))
}

/// A driver's multi-line report (with backtrace placeholders) as one line.
fn one_line(report: &str) -> String {
    report
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.contains("backtrace") && *line != "Backtrace")
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use std::sync::Barrier;
    use std::time::Duration;

    use super::*;

    /// A device failure found on rank 1 ends its calls with the cause, and rank 0's
    /// pending call fails naming rank 1 and the cause, while rank 1 is still in the
    /// group (the runner's own notice of its departure comes later).
    #[test]
    fn a_device_failure_ends_this_ranks_calls_and_tells_its_peers() {
        let answered = Barrier::new(2);
        let tag = ExchangeTag::new(0, ExchangeOp::Barrier);
        let results = ep_mesh::run_local(2, Duration::from_secs(600), |comm| {
            let comm = Arc::new(comm);
            let rank = comm.rank();
            let exchange = SharedExchange::new(comm.clone(), comm, 3);
            let result = if rank == 1 {
                let found = exchange.device_failed("CUDA_ERROR_INVALID_VALUE\n  Backtrace");
                let later = exchange.check_pairing(tag, &[0, 0], &[0, 0]);
                assert_eq!(later, Err(found.clone()), "a later call ends the same way");
                Err(found)
            } else {
                exchange.check_pairing(tag, &[0, 0], &[0, 0])
            };
            answered.wait();
            Ok(result)
        });
        let mut results = results.into_iter().map(|r| r.unwrap());
        let (peer, own) = (results.next().unwrap(), results.next().unwrap());
        let cause = EpError::DeviceFailed {
            rank: 1,
            reason: "CUDA_ERROR_INVALID_VALUE".into(),
        };
        assert_eq!(own, Err(cause));
        assert_eq!(
            peer,
            Err(EpError::PeerFailed {
                rank: 1,
                reason: "its device failed: CUDA_ERROR_INVALID_VALUE".into()
            })
        );
    }
}
