//! Activation checkpointing: a micro-batch's loss and gradients with only each decoder layer's
//! input kept from the forward. The first pass runs the layers without keeping their graphs;
//! the backward goes layer by layer from the top, recomputing one layer from its saved input
//! (its caches rewound to where the first pass found them) and back-propagating the gradient
//! of its output into its adapter's variables and its input. Memory per token is the layer
//! inputs (`layers × hidden` floats) plus one layer's activations, against every layer's for
//! the plain backward; the cost is about one more forward. Depends on `model`.

use candle_core::{Tensor, Var};

use super::dataset::Example;
use super::error::TrainError;
use super::head_loss::head_cross_entropy;
use super::trainer::{accumulate, target_rows};
use crate::model::llama::SeqInput;
use crate::model::{AdapterWeights, BatchInput, Llama, LogitsRows};

/// The mean loss of `examples`; adds `share ×` its gradient in each of `vars` to `acc`. Ends
/// with `TrainError::Cancelled` (its step left for the caller to fill in) once `stop` is set.
pub fn loss_and_grads(
    model: &Llama,
    weights: &AdapterWeights,
    examples: &[&Example],
    share: f64,
    vars: &[&Var],
    acc: &mut [Option<Tensor>],
    stop: Option<&std::sync::atomic::AtomicBool>,
) -> Result<f32, TrainError> {
    // Checked at every layer: a cancel ends the work within a layer's time, not a micro-batch's.
    let stopped = || {
        stop.is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed))
            .then_some(TrainError::Cancelled { step: 0 })
    };
    let mut caches: Vec<_> = examples.iter().map(|_| model.new_cache()).collect();
    let (rows, targets) = target_rows(weights, examples);
    let mut input = BatchInput {
        seqs: examples
            .iter()
            .zip(caches.iter_mut())
            .map(|(ex, c)| SeqInput::new(&ex.ids, c).with_adapter(Some(weights)))
            .collect(),
        logits: LogitsRows::SelectHidden(rows),
    };
    let (embedded, staged) = model.begin(&mut input, None)?;
    let layers = model.layers.len();
    let mut inputs = Vec::with_capacity(layers);
    let mut marks = Vec::with_capacity(layers);
    let mut x = embedded.detach();
    for l in 0..layers {
        if let Some(e) = stopped() {
            return Err(e);
        }
        let mark: Vec<_> = input.seqs.iter().map(|s| s.cache.mark(l)).collect();
        inputs.push(x.clone());
        let y = model.layer(l, x, &staged, &mut input, None)?;
        // The keys and values just appended hold this layer's graph: drop them now.
        for (s, m) in input.seqs.iter_mut().zip(&mark) {
            s.cache.rewind(l, m);
        }
        marks.push(mark);
        x = y.detach();
    }
    let top = Var::from_tensor(&x)?;
    let hidden = model.head(top.as_tensor().clone(), &staged, &input.logits)?;
    let loss = head_cross_entropy(&hidden, &model.lm_head, &targets)?;
    let value = loss.to_scalar::<f32>()?;
    let grads = (loss * share)?.backward()?;
    accumulate(&grads, vars, acc)?;
    let mut grad = grads
        .get(top.as_tensor())
        .cloned()
        .unwrap_or(top.as_tensor().zeros_like()?);
    drop(grads);
    for l in (0..layers).rev() {
        if let Some(e) = stopped() {
            return Err(e);
        }
        let x_in = Var::from_tensor(&inputs[l])?;
        let y = model.layer(l, x_in.as_tensor().clone(), &staged, &mut input, None)?;
        let grads = (y * &grad)?.sum_all()?.backward()?;
        for (s, m) in input.seqs.iter_mut().zip(&marks[l]) {
            s.cache.rewind(l, m);
        }
        accumulate(&grads, vars, acc)?;
        grad = match grads.get(x_in.as_tensor()) {
            Some(g) => g.clone(),
            None => grad.zeros_like()?,
        };
        inputs.truncate(l);
    }
    // The embedding's trainable part (a prompt-tuning soft prompt).
    if embedded.track_op() {
        let grads = (embedded * &grad)?.sum_all()?.backward()?;
        accumulate(&grads, vars, acc)?;
    }
    Ok(value)
}
