//! The contiguous transpose of a 2-D CPU tensor in tiles (candle's strided copy computes an
//! index per element: a third of an adapter's bind time went there). Other devices and
//! dtypes take candle's path.

use candle_core::{CpuStorage, Result, Storage, Tensor};

const TILE: usize = 32;

fn tiles<T: Copy>(src: &[T], rows: usize, cols: usize) -> Vec<T> {
    // Filled first: the tiles write `out` out of order.
    let mut out = src.to_vec();
    for i0 in (0..rows).step_by(TILE) {
        for j0 in (0..cols).step_by(TILE) {
            for i in i0..(i0 + TILE).min(rows) {
                let row = &src[i * cols..(i + 1) * cols];
                for j in j0..(j0 + TILE).min(cols) {
                    out[j * rows + i] = row[j];
                }
            }
        }
    }
    out
}

/// `t.t().contiguous()` for a 2-D tensor.
pub fn transposed(t: &Tensor) -> Result<Tensor> {
    let (rows, cols) = t.dims2()?;
    if !t.device().is_cpu() {
        return t.t()?.contiguous();
    }
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let (shape, dev) = ((cols, rows), t.device());
    match (layout.contiguous_offsets(), &*storage) {
        (Some((a, b)), Storage::Cpu(CpuStorage::F32(v))) => {
            Tensor::from_vec(tiles(&v[a..b], rows, cols), shape, dev)
        }
        (Some((a, b)), Storage::Cpu(CpuStorage::F16(v))) => {
            Tensor::from_vec(tiles(&v[a..b], rows, cols), shape, dev)
        }
        (Some((a, b)), Storage::Cpu(CpuStorage::BF16(v))) => {
            Tensor::from_vec(tiles(&v[a..b], rows, cols), shape, dev)
        }
        _ => {
            drop(storage);
            t.t()?.contiguous()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn equals_candles_transpose_at_odd_shapes_and_dtypes() {
        let dev = Device::Cpu;
        for (r, c) in [(1, 1), (3, 70), (16, 576), (65, 33), (192, 8)] {
            let x = Tensor::randn(0f32, 1.0, (r, c), &dev).unwrap();
            for dt in [DType::F32, DType::F16, DType::BF16] {
                let x = x.to_dtype(dt).unwrap();
                let ours = transposed(&x).unwrap();
                let theirs = x.t().unwrap().contiguous().unwrap();
                assert_eq!(ours.dims(), [c, r]);
                let (o, t) = (
                    ours.to_dtype(DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap(),
                    theirs
                        .to_dtype(DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap(),
                );
                assert_eq!(o, t, "{r}x{c} {dt:?}");
            }
            // A view (not contiguous) too.
            let view = x.t().unwrap();
            assert_eq!(
                transposed(&view)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
                x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
    }
}
