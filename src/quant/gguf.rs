//! GGUF quantized tensors served in their stored quantization: Q4_1 and Q8_0 by our own
//! repacked integer kernels (`q4_1.rs`, `q8_0.rs`), the other types (Q4_0, Q5_0, Q5_1, Q8_0, Q2_K … Q6_K) by candle's
//! `QMatMul`, which also quantizes activations to 8 bits and takes integer dot products (with
//! repacked AVX-512 VNNI kernels for Q4_K, Q6_K and Q8_0). Never dequantized for serving.
//! No backward: training loads the model in f32.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Result, Tensor};

use super::q4_1::Q41Weight;
use super::q8_0::Q80Weight;

/// The quantization types served natively.
pub const SUPPORTED: &[GgmlDType] = &[
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// The names of `SUPPORTED`, for error messages.
pub fn supported_names() -> String {
    SUPPORTED
        .iter()
        .map(|t| format!("{t:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Q4_1 and Q8_0 keep only their repacked tiles (the GGUF bytes are dropped); the others keep
/// the stored tensor.
#[derive(Clone)]
enum Kernel {
    Q41(Arc<Q41Weight>),
    Q80(Arc<Q80Weight>),
    Ggml(QMatMul, Arc<QTensor>),
}

/// A quantized `[out, in]` weight and its matmul.
#[derive(Clone)]
pub struct QuantLinear {
    kernel: Kernel,
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
}

impl std::fmt::Debug for QuantLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QuantLinear[{}, {}, {:?}]",
            self.rows, self.cols, self.dtype
        )
    }
}

impl QuantLinear {
    /// Serves `q` (`[out, in]`) as stored; `None` for a type not in `SUPPORTED`.
    pub fn new(q: Arc<QTensor>) -> Result<Option<Self>> {
        if !SUPPORTED.contains(&q.dtype()) {
            return Ok(None);
        }
        let (rows, cols) = q.shape().dims2()?;
        let dtype = q.dtype();
        let whole_blocks = cols % super::int8::QK == 0;
        let kernel = match dtype {
            GgmlDType::Q4_1 if whole_blocks => Kernel::Q41(Arc::new(
                Q41Weight::from_gguf(&q.data()?, rows, cols).map_err(candle_core::Error::msg)?,
            )),
            GgmlDType::Q8_0 if whole_blocks => Kernel::Q80(Arc::new(
                Q80Weight::from_gguf(&q.data()?, rows, cols).map_err(candle_core::Error::msg)?,
            )),
            _ => Kernel::Ggml(QMatMul::from_arc(q.clone())?, q),
        };
        Ok(Some(Self {
            kernel,
            dtype,
            rows,
            cols,
        }))
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    pub fn dtype(&self) -> GgmlDType {
        self.dtype
    }

    /// Bytes held for serving.
    pub fn bytes(&self) -> usize {
        match &self.kernel {
            Kernel::Q41(w) => w.bytes(),
            Kernel::Q80(w) => w.bytes(),
            Kernel::Ggml(_, q) => q.storage_size_in_bytes(),
        }
    }

    /// The weight in f32 (DoRA norms, merging); a temporary, never kept for serving.
    pub fn dequantize(&self) -> Result<Tensor> {
        match &self.kernel {
            Kernel::Q41(w) => {
                Tensor::from_vec(w.dequantize(), (self.rows, self.cols), &Device::Cpu)
            }
            Kernel::Q80(w) => {
                Tensor::from_vec(w.dequantize(), (self.rows, self.cols), &Device::Cpu)
            }
            Kernel::Ggml(_, q) => q.dequantize(&Device::Cpu),
        }
    }

    /// Rows `ids` (`[n]` u32) in f32, `[n, in]`: an embedding lookup on the same bytes a tied
    /// lm_head uses.
    pub fn rows(&self, ids: &Tensor) -> Result<Tensor> {
        let idx: Vec<u32> = ids.flatten_all()?.to_vec1()?;
        if let Some(&bad) = idx.iter().find(|&&i| i as usize >= self.rows) {
            candle_core::bail!(
                "token id {bad} is outside the embedding of {} rows",
                self.rows
            );
        }
        let n = idx.len();
        match &self.kernel {
            Kernel::Q41(w) => {
                Tensor::from_vec(w.dequantize_rows(&idx), (n, self.cols), &Device::Cpu)
            }
            Kernel::Q80(w) => {
                Tensor::from_vec(w.dequantize_rows(&idx), (n, self.cols), &Device::Cpu)
            }
            Kernel::Ggml(_, q) => q.embedding(ids),
        }
    }

    /// `x · Wᵀ` for `x` of `[rows, in]` (f32).
    pub fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        if x.track_op() {
            candle_core::bail!(
                "a GGUF-quantized base has no backward; load the model with `--dtype f32` to train"
            );
        }
        let host = || -> Result<(usize, Vec<f32>)> {
            Ok((
                x.dim(0)?,
                x.to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1()?,
            ))
        };
        match &self.kernel {
            Kernel::Q41(w) => {
                let (n, xs) = host()?;
                Tensor::from_vec(w.matmul_t(&xs, n), (n, self.rows), x.device())
            }
            Kernel::Q80(w) => {
                let (n, xs) = host()?;
                Tensor::from_vec(w.matmul_t(&xs, n), (n, self.rows), x.device())
            }
            Kernel::Ggml(m, _) => m.forward(x),
        }
    }
}

/// Rows of a quantized `[rows, cols]` tensor reordered by `perm` (`out[i] = in[perm[i]]`):
/// whole rows of blocks move, nothing is requantized.
pub fn permute_rows(q: &QTensor, perm: &[usize]) -> Result<QTensor> {
    let (rows, cols) = q.shape().dims2()?;
    let dtype = q.dtype();
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
    let data = q.data()?;
    if perm.len() != rows || data.len() != rows * row_bytes {
        candle_core::bail!("row permutation does not fit a [{rows}, {cols}] {dtype:?} tensor");
    }
    let mut out = Vec::with_capacity(data.len());
    for &p in perm {
        out.extend_from_slice(&data[p * row_bytes..(p + 1) * row_bytes]);
    }
    let storage = candle_core::quantized::QStorage::from_data(
        std::borrow::Cow::Owned(out),
        &Device::Cpu,
        dtype,
    )?;
    QTensor::new(storage, (rows, cols))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weight(rows: usize, cols: usize) -> Tensor {
        let v: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 2654435761usize % 10007) as f32 / 10007.0 - 0.5) * 0.1)
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }

    #[test]
    fn every_supported_type_matches_its_dequantized_matmul() {
        // 256-value rows fit the K-quants' superblocks; 48 and 33 rows are not multiples of 16.
        for &(rows, cols) in &[(48usize, 256usize), (33, 512), (64, 768)] {
            let w = weight(rows, cols);
            for &ty in SUPPORTED {
                let q = Arc::new(QTensor::quantize(&w, ty).unwrap());
                let lin = QuantLinear::new(q.clone()).unwrap().unwrap();
                let dense = lin.dequantize().unwrap();
                for n in [1usize, 3, 8, 9, 32] {
                    let xv: Vec<f32> = (0..n * cols)
                        .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 2.0)
                        .collect();
                    let x = Tensor::from_vec(xv, (n, cols), &Device::Cpu).unwrap();
                    let got = lin.matmul_t(&x).unwrap();
                    let want = x.matmul(&dense.t().unwrap()).unwrap();
                    // Activations are quantized to 8 bits per block (127 levels of the block's
                    // max |x| = 1): relative to Σ|w·x| the error stays below 1/127.
                    let scale = x
                        .abs()
                        .unwrap()
                        .matmul(&dense.abs().unwrap().t().unwrap())
                        .unwrap();
                    let err = ((got - &want).unwrap().abs().unwrap() / (scale + 1e-6).unwrap())
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap();
                    assert!(
                        err < 1.0 / 127.0,
                        "{ty:?} {rows}x{cols} n={n}: relative error {err}"
                    );
                }
            }
        }
    }

    #[test]
    fn permuted_rows_move_whole() {
        let w = weight(4, 64);
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let p = permute_rows(&q, &[2, 0, 3, 1]).unwrap();
        let (a, b) = (
            q.dequantize(&Device::Cpu).unwrap(),
            p.dequantize(&Device::Cpu).unwrap(),
        );
        for (i, &src) in [2usize, 0, 3, 1].iter().enumerate() {
            let d = (b.get(i).unwrap() - a.get(src).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(d, 0.0);
        }
    }
}
