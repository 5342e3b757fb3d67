//! What each running sequence feeds one step: decode rows (with their prompt-lookup proposals),
//! prompts in chunks within the step's token and attention budgets.

use super::Active;

/// The tokens proposed in a row fed to `a` (after its last sampled token): none unless it was
/// decoding and was fed more than its one next token.
pub(super) fn drafted<'t>(a: &Active, tokens: &'t [u32]) -> &'t [u32] {
    if a.seq.prefilling() || tokens.len() <= 1 {
        &[]
    } else {
        &tokens[1..]
    }
}

/// Query–key pairs of prompt attention one step may compute, per token of `budget`: a chunk's
/// attention grows with its position, so a long prompt's late chunks shrink and the streams
/// beside it keep their pace where attention is slow (a CPU without AVX-512: 12 s steps at
/// position 8,000 with whole 256-token chunks; 1.8 s steps with 22 streams at ~1,500 positions
/// and a 256-token chunk at 1,000, when the cap was 1,024 per chunk).
const PAIRS_PER_TOKEN: usize = 384;

/// The most prompt tokens a chunk starting at `position` may hold when `pairs` query–key pairs
/// are left this step (at least 16). `budget` 0 (whole prompts at once) is not capped.
fn chunk_cap(budget: usize, pairs: usize, position: usize) -> usize {
    match budget {
        0 => usize::MAX,
        _ => (pairs / (position + 1)).max(16),
    }
}

/// What each running sequence feeds this step, within `budget` tokens (0: no limit): decode rows
/// one token each, always; prompts in the scheduler's order (better priority, then the tenant
/// with the least service, then the earliest admitted), as much of their rest as the token and
/// attention budgets leave; at least one token for the first, so a prompt never starves. Only
/// prompts of the best priority present share a step, and while one is fed, worse priorities'
/// streams skip the step: they wait rather than slow its first token. (Giving an under-served
/// tenant's prompt the step to itself was tried: a tenant sending short prompts non-stop then
/// kept every other tenant's prompts out for minutes.) Empty: skip.
pub(super) fn step_inputs(
    active: &[Active],
    ranks: &[(i32, f64, u64)],
    budget: usize,
    history: &crate::engine::speculative::History,
) -> Vec<Vec<u32>> {
    let decode = active.iter().filter(|a| !a.seq.prefilling()).count();
    let owed = active.iter().any(|a| a.owed_step && a.seq.prefilling());
    let mut left = if budget == 0 {
        usize::MAX
    } else if owed {
        budget
    } else {
        budget.saturating_sub(decode)
    };
    let mut pairs = budget.saturating_mul(PAIRS_PER_TOKEN);
    let mut inputs: Vec<Vec<u32>> = active
        .iter()
        .map(|a| {
            if a.seq.prefilling() {
                Vec::new()
            } else {
                a.seq.next_input().to_vec()
            }
        })
        .collect();
    let mut prompts: Vec<usize> = (0..active.len())
        .filter(|&i| active[i].seq.prefilling())
        .collect();
    prompts.sort_by(|&a, &b| {
        ranks[a]
            .partial_cmp(&ranks[b])
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    // Prompts owed a step of their own (`interrupt`) have it: nothing else is fed beside them.
    if owed {
        prompts.retain(|&i| active[i].owed_step);
        inputs.iter_mut().for_each(Vec::clear);
    }
    let first = prompts.first().map(|&i| ranks[i].0);
    for (k, i) in prompts.into_iter().enumerate() {
        if Some(ranks[i].0) != first {
            continue;
        }
        let a = &active[i];
        let input = a.seq.next_input();
        let position = a.seq.position();
        let mut n = input
            .len()
            .min(left)
            .min(chunk_cap(budget, pairs, position));
        if pairs < position + 1 && k > 0 {
            n = 0; // this step's attention budget is spent
        }
        if n == 0 && k == 0 {
            n = 1;
        }
        left = left.saturating_sub(n);
        pairs = pairs.saturating_sub(n * (position + n / 2 + 1));
        inputs[i] = input[..n].to_vec();
    }
    // A better priority's prompt gets the step to itself (with its own priority's streams):
    // worse priorities wait a step rather than slow its first token.
    if let Some(best) = first {
        for (i, input) in inputs.iter_mut().enumerate() {
            if ranks[i].0 > best {
                input.clear();
            }
        }
    }
    // Speculative decoding: streams that ask for it get the tokens prompt lookup proposes, in
    // what is left of the budget, while the step holds few streams.
    let streams = (0..active.len())
        .filter(|&i| !active[i].seq.prefilling() && !inputs[i].is_empty())
        .count();
    for (a, input) in active.iter().zip(inputs.iter_mut()) {
        let Some(spec) = a.seq.speculative() else {
            continue;
        };
        if a.seq.prefilling() || input.is_empty() || streams > spec.max_batch || left == 0 {
            continue;
        }
        // No proposal past the answer's last token (nor past the positions it reserved).
        let limit = a.seq.remaining().saturating_sub(1).min(left);
        if limit == 0 {
            continue;
        }
        let context: Vec<u32> = a
            .request
            .prompt
            .iter()
            .chain(&a.seq.generated)
            .copied()
            .collect();
        let past = history.past(super::Worker::tenant(&a.request), a.adapter_ptr());
        let proposal = crate::engine::speculative::propose(&context, past, spec, limit);
        left = left.saturating_sub(proposal.len());
        input.extend(proposal);
    }
    inputs
}

#[cfg(test)]
mod tests {
    use super::{chunk_cap, PAIRS_PER_TOKEN};

    #[test]
    fn chunks_shrink_with_their_position_and_unchunked_stays_whole() {
        let pairs = 256 * PAIRS_PER_TOKEN;
        assert_eq!(chunk_cap(0, pairs, 8000), usize::MAX);
        assert!(chunk_cap(256, pairs, 0) >= 256 && chunk_cap(256, pairs, 383) >= 256);
        assert_eq!(chunk_cap(256, pairs, 8000), 16);
        assert_eq!(chunk_cap(256, pairs, 1000), 98);
        assert_eq!(chunk_cap(256, 0, 10), 16);
    }
}
