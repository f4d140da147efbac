//! ep-kernels: the CubeCL kernels of burn-ep (layout, slots, pack, expand, reduce, sum)
//! and their launch wrappers. Filled in by the kernels issue.
