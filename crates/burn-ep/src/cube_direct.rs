//! Routes whose kernels reach into the peer's buffers (see
//! [`ep_mesh::DirectAccess`]): in a two-rank cuda-peer group on one GPU, a
//! dispatch's pack writes the rows bound for the peer straight into the peer's
//! receive buffers, and a combine's sum reads the rows the peer returns straight
//! from the peer's buffer. No row is staged in a send buffer or copied by the
//! transport.
//!
//! A kernel reaches a peer's buffer through a one-row stand-in of its own, bound to
//! the peer's address (`EpRuntime::with_redirected`) less the offset of the peer's
//! segment, so that the kernel's usual indexing (send rows in rank order) lands in
//! the peer's rows. With more than one peer a kernel would need one such argument
//! per peer: those groups take the transport's copies.

use burn::tensor::DType;
use burn_cubecl::tensor::CubeTensor;
use ep_core::{counters, EpError, EpResult};

use crate::backend::RoutePlan;
use crate::cube::OwnRows;
use crate::cube_exchange::alloc_planes;
use crate::exchange::{ExchangeTag, SharedExchange};
use crate::runtime::EpRuntime;

type CubePlan<R> = RoutePlan<CubeTensor<R>, <R as cubecl::Runtime>::Device>;

/// A route of a two-rank group whose kernels reach into the peer's buffers.
pub(crate) struct Direct<'a, R: EpRuntime> {
    plan: &'a CubePlan<R>,
    exchange: &'a SharedExchange,
    own: OwnRows,
    peer: usize,
}

impl<'a, R: EpRuntime> Direct<'a, R> {
    /// The direct route of `plan`, where it has one: a CUDA runtime, two ranks, a
    /// transport giving kernels access to the peer's buffers, and this rank's own
    /// rows placed by the kernels.
    pub(crate) fn of(
        plan: &'a CubePlan<R>,
        exchange: &'a SharedExchange,
        own: Option<OwnRows>,
    ) -> Option<Self> {
        let own = own?;
        let two_ranks = plan.send_counts.len() == 2;
        (R::CUDA && two_ranks && exchange.has_direct_access()).then_some(Direct {
            plan,
            exchange,
            own,
            peer: 1 - own.rank,
        })
    }

    /// Rows going out. The peer is told where its rows land in `recv` (this rank's
    /// receive buffers, one per plane of `planes`); `pack` gets stand-ins for the
    /// send buffers, bound so that the send rows of the peer's segment land in the
    /// peer's receive buffers.
    pub(crate) fn push(
        &self,
        tag: ExchangeTag,
        planes: &[(usize, DType)],
        recv: Option<&[CubeTensor<R>]>,
        pack: impl FnOnce(&[CubeTensor<R>]),
    ) -> EpResult<()> {
        let plan = self.plan;
        let offer = self.offer(planes, recv)?;
        let mut pack = Some(pack);
        self.call(
            tag,
            planes,
            (&plan.send_counts, &plan.recv_counts),
            offer,
            &mut |stand_ins| {
                let pack = pack.take().expect("a call runs its kernels once");
                pack(stand_ins);
            },
        )
    }

    /// Rows coming back. The peer is told where the rows it sent here sit in
    /// `rows` (this rank's received-side rows); `sum` gets a stand-in for the rows
    /// that came back, bound so that the rows of the peer's segment are read from
    /// the peer's `rows`. Returns what `sum` made.
    pub(crate) fn pull(
        &self,
        tag: ExchangeTag,
        planes: &[(usize, DType)],
        rows: Option<&CubeTensor<R>>,
        sum: impl FnOnce(&CubeTensor<R>) -> Option<CubeTensor<R>>,
    ) -> EpResult<Option<CubeTensor<R>>> {
        let plan = self.plan;
        let offer = self.offer(planes, rows.map(std::slice::from_ref))?;
        let (mut sum, mut summed) = (Some(sum), None);
        // Going back, rows travel against the dispatch: the pairing is the copy
        // path's, while this rank reads where it sent and is read where it received.
        self.call(
            tag,
            planes,
            (&plan.recv_counts, &plan.send_counts),
            offer,
            &mut |stand_ins| {
                let sum = sum.take().expect("a call runs its kernels once");
                summed = sum(&stand_ins[0]);
            },
        )?;
        Ok(summed)
    }

    /// What the peer is told: for each plane, where the peer's segment of this
    /// rank's received-side `buffers` (in source-rank order) starts, and its bytes.
    fn offer(
        &self,
        planes: &[(usize, DType)],
        buffers: Option<&[CubeTensor<R>]>,
    ) -> EpResult<Vec<Vec<u64>>> {
        let (peer, counts) = (self.peer, &self.plan.recv_counts);
        let before: usize = counts[..peer].iter().sum();
        let mut offer = vec![Vec::new(); 2];
        for (i, &(cols, dtype)) in planes.iter().enumerate() {
            let row_bytes = cols * dtype.size();
            let start = match buffers {
                Some(buffers) => R::cuda_buffer(&buffers[i])?.address + (before * row_bytes) as u64,
                None => 0,
            };
            offer[peer].extend([start, (counts[peer] * row_bytes) as u64]);
        }
        Ok(offer)
    }

    /// One direct call, paired on `counts` (sent, received). `kernels` run with
    /// one-row stand-ins per plane, bound to the peer's offered segments less the
    /// offset of the peer's segment in this rank's own indexing (its
    /// `plan.send_counts` in rank order, both ways).
    fn call(
        &self,
        tag: ExchangeTag,
        planes: &[(usize, DType)],
        counts: (&[usize], &[usize]),
        offer: Vec<Vec<u64>>,
        kernels: &mut dyn FnMut(&[CubeTensor<R>]),
    ) -> EpResult<()> {
        let (me, peer, plan) = (self.own.rank, self.peer, self.plan);
        let stand_ins = alloc_planes::<R>(&plan.device, planes, 1)
            .unwrap_or_else(|| unreachable!("one row is some rows"));
        // Every buffer of a rank is ordered on its one stream.
        let stream = R::cuda_buffer(&stand_ins[0])?.stream;
        let flag = |counts: &[usize]| {
            let mut flags = [false; 2];
            flags[peer] = counts[peer] > 0;
            flags
        };
        // Out and back alike, this rank touches the peer's rows of its own tokens,
        // and the peer touches this rank's rows of the peer's tokens.
        let (reach, reached_by) = (flag(&plan.send_counts), flag(&plan.recv_counts));
        let peer_rows = plan.send_counts[peer];
        let before: usize = plan.send_counts[..peer].iter().sum();
        self.exchange.direct_call(
            tag,
            counts,
            offer,
            (&reach, &reached_by),
            stream,
            &mut |offers| {
                let offered = &offers[peer];
                // What leaves this rank: the rows it writes to the peer, or the rows
                // the peer reads from it.
                let row_bytes: usize = planes.iter().map(|&(c, d)| c * d.size()).sum();
                counters::sent(counts.0[peer] * row_bytes);
                let mut redirects = Vec::new();
                for (i, &(cols, dtype)) in planes.iter().enumerate().filter(|_| peer_rows > 0) {
                    let row_bytes = cols * dtype.size();
                    let (start, bytes) = (offered[2 * i], offered[2 * i + 1] as usize);
                    let offset = (before * row_bytes) as u64;
                    if bytes != peer_rows * row_bytes || start < offset {
                        return Err(EpError::Transport(format!(
                            "rank {me} has {} bytes for rank {peer}, which offers {bytes} \
                             at {start:#x}",
                            peer_rows * row_bytes
                        )));
                    }
                    let from = R::cuda_buffer(&stand_ins[i])?.address;
                    redirects.push((from, start - offset));
                }
                // SAFETY: each stand-in is bound to the peer's segment less the
                // offset of its rows in this rank's indexing, so the kernels touch
                // exactly the peer's `peer_rows` rows there (checked against what the
                // peer offered), launched without bounds checks; the direct call
                // orders them after the peer's readiness and the peer's later work
                // after them.
                unsafe { R::with_redirected(&redirects, || kernels(&stand_ins)) }
            },
        )
    }
}
