//! Who is who in a group of ranks.

/// A rank's view of the group: world size, its own rank, and which ranks share its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mesh {
    world_size: usize,
    rank: usize,
    ranks_per_node: usize,
}

impl Mesh {
    /// A mesh whose nodes each hold `ranks_per_node` consecutive ranks.
    pub fn new(world_size: usize, rank: usize, ranks_per_node: usize) -> Self {
        assert!(rank < world_size, "rank {rank} outside world {world_size}");
        assert!(ranks_per_node > 0, "a node holds at least one rank");
        Self {
            world_size,
            rank,
            ranks_per_node,
        }
    }

    /// Every rank on one node (one process).
    pub fn single_node(world_size: usize, rank: usize) -> Self {
        Self::new(world_size, rank, world_size)
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn node_of(&self, rank: usize) -> usize {
        rank / self.ranks_per_node
    }

    pub fn node(&self) -> usize {
        self.node_of(self.rank)
    }

    /// Whether `rank` shares this rank's node.
    pub fn is_local(&self, rank: usize) -> bool {
        self.node_of(rank) == self.node()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_hold_consecutive_ranks() {
        let mesh = Mesh::new(8, 5, 4);
        assert_eq!(mesh.node(), 1);
        assert!(mesh.is_local(4));
        assert!(!mesh.is_local(3));
        assert!(Mesh::single_node(3, 2).is_local(0));
    }
}
