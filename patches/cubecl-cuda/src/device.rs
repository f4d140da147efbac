use cubecl_common::device::{Device, DeviceId};

// It is not clear if CUDA has a limit on the number of bindings it can hold at
// any given time, but it's highly unlikely that it's more than this. We can
// also assume that we'll never have more than this many bindings in flight,
// so it's 'safe' to store only this many bindings.
pub const CUDA_MAX_BINDINGS: u32 = 1024;

#[derive(new, Clone, PartialEq, Eq, Default, Hash)]
pub struct CudaDevice {
    pub index: usize,
}

/// burn-ep: indices from this one on are further servers on a device already
/// counted: index `ordinal + LANE_STRIDE * lane` runs on CUDA device `ordinal`
/// with a CubeCL server (lock, streams, memory pools) of its own (see PATCH.md).
pub const LANE_STRIDE: usize = 256;

impl CudaDevice {
    /// burn-ep: server `lane` of CUDA device `ordinal` (lane 0 is `CudaDevice::new(ordinal)`).
    pub fn lane(ordinal: usize, lane: usize) -> Self {
        Self::new(ordinal + LANE_STRIDE * lane)
    }

    /// burn-ep: the CUDA device ordinal this device runs on.
    pub fn ordinal(&self) -> usize {
        self.index % LANE_STRIDE
    }
}

impl core::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cuda({})", self.index)
    }
}

impl Device for CudaDevice {
    fn from_id(device_id: DeviceId) -> Self {
        Self {
            index: device_id.index_id as usize,
        }
    }

    fn to_id(&self) -> DeviceId {
        DeviceId {
            type_id: 0,
            index_id: self.index as u16,
        }
    }
}
