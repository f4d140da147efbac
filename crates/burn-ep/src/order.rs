//! The order in which a group's differentiable operations run backward.
//!
//! Burn runs backward steps by graph depth, deepest first, and depth depends on what
//! a rank computed: a rank whose expert step is shorter (it received nothing, or
//! its experts are a different stack of ops) puts its combine at another depth. The
//! backward steps of dispatch and combine are collectives, so two ranks that ran them
//! in different orders would pair the exchanges of different routes.
//!
//! So every tracked operation of a group is placed deeper than the group's previous
//! tracked operation still awaiting its backward pass: its node gets one extra,
//! untracked parent (an *anchor*) one level below the previous operation's node.
//! The anchor takes no gradient; it only raises the depth. On every rank, then, the
//! group's operations run backward in the reverse of the order in which they ran
//! forward, whatever the graphs around them look like. That order is also a valid
//! order of the graph: an operation that consumes another's output always ran after
//! it.
//!
//! The chain is only kept while the previous operation's backward step is pending:
//! the step's state holds a token whose only strong reference ends when the step
//! has run or its graph was dropped. A new graph therefore starts at its natural depth, and
//! depths do not grow from one training step to the next.

use std::any::Any;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

/// Held by a pending backward step's state: while it lives, the step has not run.
pub(crate) type PendingToken = Arc<()>;

/// A type-erased autodiff node (Burn does not name its node type outside its crate).
pub(crate) type ErasedNode = Arc<dyn Any + Send + Sync>;

struct Latest {
    pending: Weak<()>,
    node: ErasedNode,
}

/// The group's latest tracked operation, while its backward step is pending.
#[derive(Default)]
pub(crate) struct BackwardOrder {
    latest: Mutex<Option<Latest>>,
}

impl BackwardOrder {
    /// The output node of the latest operation whose backward step is pending.
    pub(crate) fn pending(&self) -> Option<ErasedNode> {
        let latest = self.lock();
        let latest = latest.as_ref()?;
        latest.pending.upgrade().map(|_| latest.node.clone())
    }

    /// Records a new tracked operation whose backward state holds `token`.
    pub(crate) fn record(&self, node: impl Any + Send + Sync, token: &PendingToken) {
        *self.lock() = Some(Latest {
            pending: Arc::downgrade(token),
            node: Arc::new(node),
        });
    }

    fn lock(&self) -> MutexGuard<'_, Option<Latest>> {
        // The guarded value is replaced whole: a panic cannot leave it torn.
        self.latest.lock().unwrap_or_else(|e| e.into_inner())
    }
}
