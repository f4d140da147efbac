//! Moving row segments between ranks of the local transport as host data.
//!
//! Each rank's thread drives its own device stream, and a device buffer shared
//! between streams was seen to be read before it was written, or reused while a
//! peer still read it (wgpu). So the local transport moves host copies: one read
//! of the whole send buffer, split per destination, and one upload of everything
//! received. The CUDA transports move device memory directly.

use burn::tensor::TensorData;

/// Splits `[rows, ...]` data into consecutive row blocks of `counts` rows each.
pub(crate) fn split_rows(data: &TensorData, counts: &[usize]) -> Vec<Option<TensorData>> {
    let rows = data.shape[0];
    let bytes = data.as_bytes();
    let row_bytes = bytes.len().checked_div(rows).unwrap_or(0);
    let mut start = 0;
    counts
        .iter()
        .map(|&count| {
            let block = (count > 0).then(|| {
                let mut shape = data.shape.to_vec();
                shape[0] = count;
                let end = start + count * row_bytes;
                TensorData::from_bytes_vec(bytes[start..end].to_vec(), shape, data.dtype)
            });
            start += count * row_bytes;
            block
        })
        .collect()
}

/// Concatenates row blocks (in order) into one; `None` when there are none.
pub(crate) fn concat_rows(blocks: Vec<TensorData>) -> Option<TensorData> {
    let first = blocks.first()?;
    let (mut shape, dtype) = (first.shape.to_vec(), first.dtype);
    shape[0] = blocks.iter().map(|b| b.shape[0]).sum();
    let mut bytes = Vec::with_capacity(blocks.iter().map(|b| b.as_bytes().len()).sum());
    for block in &blocks {
        bytes.extend_from_slice(block.as_bytes());
    }
    Some(TensorData::from_bytes_vec(bytes, shape, dtype))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_then_concat_is_identity() {
        let data = TensorData::new((0..12).map(|v| v as f32).collect::<Vec<_>>(), [6, 2]);
        let parts = split_rows(&data, &[2, 0, 3, 1]);
        assert!(parts[1].is_none());
        assert_eq!(parts[2].as_ref().unwrap().shape.to_vec(), vec![3, 2]);
        let again = concat_rows(parts.into_iter().flatten().collect()).unwrap();
        assert_eq!(again, data);
        assert!(concat_rows(vec![]).is_none());
    }
}
