//! Prometheus metrics (prefix `loraplex_`). A leaf: imports nothing of the crate.
//!
//! Per-adapter series are bounded: the first `MAX_ADAPTER_LABELS` adapter names seen get
//! their own label, the rest are counted as `other`, so a flood of adapter names cannot blow up
//! the series count. A tenant's adapters (`tenant/name`) get at most `PER_TENANT_LABELS` of
//! those labels, the rest `tenant/other`, so one tenant cannot use up the slots for everyone.

use std::collections::HashSet;
use std::sync::Mutex;

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub const MAX_ADAPTER_LABELS: usize = 32;
pub const PER_TENANT_LABELS: usize = 8;

pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub e2e_latency: Histogram,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub prompt_tokens: Histogram,
    pub generation_tokens: Histogram,
    pub batch_size: Histogram,
    pub waiting: IntGauge,
    pub running: IntGauge,
    pub kv_usage: Gauge,
    pub adapter_hits: IntCounter,
    pub adapter_misses: IntCounter,
    pub adapter_evictions: IntCounter,
    pub adapter_load_seconds: Histogram,
    pub adapter_load_failures: IntCounter,
    pub adapters_resident: IntGauge,
    pub adapters_resident_bytes: IntGauge,
    pub adapter_requests: IntCounterVec,
    pub adapter_tokens: IntCounterVec,
    pub lora_info: GaugeVec,
    /// Per resident (or loading) adapter: its bytes, labelled by state and pinning.
    pub adapter_residency: IntGaugeVec,
    /// Per resident adapter: when a request last took it.
    pub adapter_last_use: GaugeVec,
    /// The engine's last running/waiting adapters and the adapters loading for requests not
    /// yet queued (`publish_lora_info` joins them).
    lora_state: std::sync::Mutex<LoraState>,
    pub engine_restarts: IntCounter,
    pub preemptions: IntCounter,
    pub shed_requests: IntCounter,
    pub interrupted_steps: IntCounter,
    pub held_rows: IntCounter,
    pub kv_window_dropped: IntCounter,
    /// Speculative decoding (prompt lookup): see `Metrics::new`.
    pub spec_steps: IntCounter,
    pub spec_tokens: IntCounter,
    pub spec_drafts: IntCounter,
    pub spec_draft_tokens: IntCounter,
    pub spec_accepted_tokens: IntCounter,
    pub rate_limited: IntCounterVec,
    pub usage_tokens: IntCounterVec,
    pub usage_requests: IntCounterVec,
    pub served_tokens: IntCounterVec,
    pub prefix_cache_queries: IntCounter,
    pub prefix_cache_hits: IntCounter,
    pub kv_pool_bytes: IntGauge,
    pub cache_config: GaugeVec,
    adapter_labels: Mutex<HashSet<String>>,
}

fn hist(name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("valid histogram")
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let secs = vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        ];
        let tokens = vec![
            1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
        ];
        let m = Self {
            registry: Registry::new(),
            requests: IntCounterVec::new(
                Opts::new(
                    "loraplex_requests_total",
                    "HTTP requests by route and status",
                ),
                &["route", "status"],
            )
            .expect("valid"),
            e2e_latency: hist(
                "loraplex_e2e_request_latency_seconds",
                "End-to-end request latency",
                secs.clone(),
            ),
            ttft: hist(
                "loraplex_time_to_first_token_seconds",
                "Time to first token",
                secs.clone(),
            ),
            itl: hist(
                "loraplex_inter_token_latency_seconds",
                "Time between tokens of a request",
                secs.clone(),
            ),
            prompt_tokens: hist(
                "loraplex_prompt_tokens",
                "Prompt tokens per request",
                tokens.clone(),
            ),
            generation_tokens: hist(
                "loraplex_generation_tokens",
                "Generated tokens per request",
                tokens,
            ),
            batch_size: hist(
                "loraplex_batch_size",
                "Sequences in one forward step",
                vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0],
            ),
            waiting: IntGauge::new(
                "loraplex_num_requests_waiting",
                "Requests waiting to be scheduled",
            )
            .expect("valid"),
            running: IntGauge::new(
                "loraplex_num_requests_running",
                "Requests in the running batch",
            )
            .expect("valid"),
            kv_usage: Gauge::new(
                "loraplex_kv_cache_usage_perc",
                "KV cache use, 0..1 of --kv-cache-tokens",
            )
            .expect("valid"),
            adapter_hits: IntCounter::new(
                "loraplex_adapter_cache_hits_total",
                "Adapter cache hits",
            )
            .expect("valid"),
            adapter_misses: IntCounter::new(
                "loraplex_adapter_cache_misses_total",
                "Adapter cache misses",
            )
            .expect("valid"),
            adapter_evictions: IntCounter::new(
                "loraplex_adapter_cache_evictions_total",
                "Adapters evicted",
            )
            .expect("valid"),
            adapter_load_seconds: hist(
                "loraplex_adapter_load_seconds",
                "Time to load and bind an adapter",
                secs,
            ),
            adapter_load_failures: IntCounter::new(
                "loraplex_adapter_load_failures_total",
                "Adapter loads that failed (bad files, a panic while binding)",
            )
            .expect("valid"),
            adapters_resident: IntGauge::new("loraplex_adapters_resident", "Resident adapters")
                .expect("valid"),
            adapters_resident_bytes: IntGauge::new(
                "loraplex_adapters_resident_bytes",
                "Bytes of resident adapters",
            )
            .expect("valid"),
            adapter_requests: IntCounterVec::new(
                Opts::new(
                    "loraplex_adapter_requests_total",
                    "Requests per adapter (bounded labels)",
                ),
                &["adapter"],
            )
            .expect("valid"),
            adapter_tokens: IntCounterVec::new(
                Opts::new(
                    "loraplex_adapter_generation_tokens_total",
                    "Generated tokens per adapter (bounded labels)",
                ),
                &["adapter"],
            )
            .expect("valid"),
            adapter_residency: IntGaugeVec::new(
                Opts::new(
                    "loraplex_adapter_residency_bytes",
                    "Bytes of each resident adapter (state=resident) and of each being loaded \
                     (state=loading, 0 until known); an adapter not listed is not resident",
                ),
                &["adapter", "state", "pinned"],
            )
            .expect("valid"),
            adapter_last_use: GaugeVec::new(
                Opts::new(
                    "loraplex_adapter_last_use_timestamp_seconds",
                    "When a request last took each resident adapter (Unix time)",
                ),
                &["adapter"],
            )
            .expect("valid"),
            lora_state: std::sync::Mutex::default(),
            lora_info: GaugeVec::new(
                Opts::new(
                    "loraplex_lora_requests_info",
                    "Running and waiting LoRA adapters (value: update time)",
                ),
                &["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
            )
            .expect("valid"),
            engine_restarts: IntCounter::new(
                "loraplex_engine_restarts_total",
                "Model steps that panicked (their requests failed; serving went on)",
            )
            .expect("valid"),
            preemptions: IntCounter::new(
                "loraplex_num_preemptions_total",
                "Running sequences preempted (recomputed later) for a better priority or a tenant within its share",
            )
            .expect("valid"),
            shed_requests: IntCounter::new(
                "loraplex_shed_requests_total",
                "Waiting requests shed (503) for better-priority ones when the queue was full",
            )
            .expect("valid"),
            interrupted_steps: IntCounter::new(
                "loraplex_interrupted_steps_total",
                "Steps stopped between layers (and redone) for a request owed a prompt step of its own",
            )
            .expect("valid"),
            held_rows: IntCounter::new(
                "loraplex_fair_held_rows_total",
                "Rows that sat a step out: their tenant was too far ahead of one sharing the step",
            )
            .expect("valid"),
            kv_window_dropped: IntCounter::new(
                "loraplex_kv_window_dropped_blocks_total",
                "KV blocks given back because they left every layer's sliding window",
            )
            .expect("valid"),
            spec_steps: IntCounter::new(
                "loraplex_spec_decode_steps_total",
                "Decode steps of sequences that speculate (with or without a proposal)",
            )
            .expect("valid"),
            spec_tokens: IntCounter::new(
                "loraplex_spec_decode_tokens_total",
                "Tokens those steps produced: divided by the steps, the tokens per forward (1 without speculation)",
            )
            .expect("valid"),
            spec_drafts: IntCounter::new(
                "loraplex_spec_decode_drafts_total",
                "Steps that verified a proposal of one or more tokens",
            )
            .expect("valid"),
            spec_draft_tokens: IntCounter::new(
                "loraplex_spec_decode_draft_tokens_total",
                "Tokens proposed by prompt lookup",
            )
            .expect("valid"),
            spec_accepted_tokens: IntCounter::new(
                "loraplex_spec_decode_accepted_tokens_total",
                "Proposed tokens kept (acceptance rate: over the proposed)",
            )
            .expect("valid"),
            rate_limited: IntCounterVec::new(
                Opts::new(
                    "loraplex_rate_limited_total",
                    "Requests refused with 429 by a tenant's rate limit, by limit",
                ),
                &["limit"],
            )
            .expect("valid"),
            usage_tokens: IntCounterVec::new(
                Opts::new(
                    "loraplex_usage_tokens_total",
                    "Tokens served per tenant and adapter (kind: prompt, completion, cached)",
                ),
                &["tenant", "adapter", "kind"],
            )
            .expect("valid"),
            usage_requests: IntCounterVec::new(
                Opts::new(
                    "loraplex_usage_requests_total",
                    "Requests served per tenant and adapter",
                ),
                &["tenant", "adapter"],
            )
            .expect("valid"),
            served_tokens: IntCounterVec::new(
                Opts::new(
                    "loraplex_tenant_served_tokens_total",
                    "Tokens the engine served per tenant as it served them (kind: prompt, generated; a recompute after preemption is not counted again): the fair scheduler's measure",
                ),
                &["tenant", "kind"],
            )
            .expect("valid"),
            prefix_cache_queries: IntCounter::new(
                "loraplex_prefix_cache_queries_total",
                "Prompt tokens looked up in the prefix cache",
            )
            .expect("valid"),
            prefix_cache_hits: IntCounter::new(
                "loraplex_prefix_cache_hits_total",
                "Prompt tokens whose KV came from the prefix cache (same adapter and version)",
            )
            .expect("valid"),
            kv_pool_bytes: IntGauge::new(
                "loraplex_kv_pool_bytes",
                "Bytes of the KV block pool allocated at start-up",
            )
            .expect("valid"),
            cache_config: GaugeVec::new(
                Opts::new(
                    "loraplex_cache_config_info",
                    "The KV pool's layout (value 1): tokens per block and blocks",
                ),
                &["block_size", "num_gpu_blocks"],
            )
            .expect("valid"),
            adapter_labels: Mutex::new(HashSet::new()),
        };
        let r = &m.registry;
        let regs: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.requests.clone()),
            Box::new(m.e2e_latency.clone()),
            Box::new(m.ttft.clone()),
            Box::new(m.itl.clone()),
            Box::new(m.prompt_tokens.clone()),
            Box::new(m.generation_tokens.clone()),
            Box::new(m.batch_size.clone()),
            Box::new(m.waiting.clone()),
            Box::new(m.running.clone()),
            Box::new(m.kv_usage.clone()),
            Box::new(m.adapter_hits.clone()),
            Box::new(m.adapter_misses.clone()),
            Box::new(m.adapter_evictions.clone()),
            Box::new(m.adapter_load_seconds.clone()),
            Box::new(m.adapter_load_failures.clone()),
            Box::new(m.adapters_resident.clone()),
            Box::new(m.adapters_resident_bytes.clone()),
            Box::new(m.adapter_requests.clone()),
            Box::new(m.adapter_tokens.clone()),
            Box::new(m.lora_info.clone()),
            Box::new(m.adapter_residency.clone()),
            Box::new(m.adapter_last_use.clone()),
            Box::new(m.engine_restarts.clone()),
            Box::new(m.preemptions.clone()),
            Box::new(m.shed_requests.clone()),
            Box::new(m.interrupted_steps.clone()),
            Box::new(m.held_rows.clone()),
            Box::new(m.kv_window_dropped.clone()),
            Box::new(m.spec_steps.clone()),
            Box::new(m.spec_tokens.clone()),
            Box::new(m.spec_drafts.clone()),
            Box::new(m.spec_draft_tokens.clone()),
            Box::new(m.spec_accepted_tokens.clone()),
            Box::new(m.rate_limited.clone()),
            Box::new(m.usage_tokens.clone()),
            Box::new(m.usage_requests.clone()),
            Box::new(m.served_tokens.clone()),
            Box::new(m.prefix_cache_queries.clone()),
            Box::new(m.prefix_cache_hits.clone()),
            Box::new(m.kv_pool_bytes.clone()),
            Box::new(m.cache_config.clone()),
        ];
        for c in regs {
            r.register(c).expect("unique metric names");
        }
        m
    }

    /// The label for `adapter`: its name while fewer than `MAX_ADAPTER_LABELS` names are in
    /// use, else `other`.
    pub fn adapter_label(&self, adapter: &str) -> String {
        let mut seen = self.adapter_labels.lock().expect("labels lock");
        if seen.contains(adapter) {
            return adapter.to_string();
        }
        if let Some((tenant, _)) = adapter.split_once('/') {
            let prefix = format!("{tenant}/");
            if seen.iter().filter(|l| l.starts_with(&prefix)).count() >= PER_TENANT_LABELS {
                return format!("{tenant}/other");
            }
        }
        if seen.len() < MAX_ADAPTER_LABELS {
            seen.insert(adapter.to_string());
            adapter.to_string()
        } else {
            "other".to_string()
        }
    }

    /// The running/waiting adapters in the shape the Gateway API Inference Extension reads
    /// (the engine's view; adapters still loading for their requests count as waiting).
    pub fn set_lora_info(&self, max_lora: usize, running: Vec<String>, waiting: Vec<String>) {
        let mut state = self.lora_state.lock().unwrap_or_else(|p| p.into_inner());
        state.max_lora = max_lora;
        state.running = running;
        state.waiting = waiting;
        self.publish_lora_info(&state);
    }

    fn publish_lora_info(&self, state: &LoraState) {
        let mut waiting: Vec<&str> = state
            .waiting
            .iter()
            .map(String::as_str)
            .chain(state.loading.keys().map(String::as_str))
            .collect();
        waiting.sort_unstable();
        waiting.dedup();
        self.lora_info.reset();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.lora_info
            .with_label_values(&[
                &state.max_lora.to_string(),
                &state.running.join(","),
                &waiting.join(","),
            ])
            .set(now);
    }

    /// A request's adapter is being loaded (before the request is queued): it is waiting
    /// until the returned guard drops.
    pub fn loading(self: &std::sync::Arc<Self>, adapter: &str) -> LoadingGuard {
        let mut state = self.lora_state.lock().unwrap_or_else(|p| p.into_inner());
        *state.loading.entry(adapter.to_string()).or_default() += 1;
        self.publish_lora_info(&state);
        LoadingGuard {
            metrics: self.clone(),
            adapter: adapter.to_string(),
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding");
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[derive(Debug, Default)]
struct LoraState {
    max_lora: usize,
    running: Vec<String>,
    waiting: Vec<String>,
    /// Adapters loading, with how many loads of each.
    loading: std::collections::BTreeMap<String, usize>,
}

/// Ends a `Metrics::loading` (also when the load panics).
pub struct LoadingGuard {
    metrics: std::sync::Arc<Metrics>,
    adapter: String,
}

impl Drop for LoadingGuard {
    fn drop(&mut self) {
        let m = &self.metrics;
        let mut state = m.lora_state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = state.loading.get_mut(&self.adapter) {
            *n -= 1;
            if *n == 0 {
                state.loading.remove(&self.adapter);
            }
        }
        m.publish_lora_info(&state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_labels_are_bounded() {
        let m = Metrics::new();
        for i in 0..MAX_ADAPTER_LABELS {
            assert_eq!(m.adapter_label(&format!("a{i}")), format!("a{i}"));
        }
        assert_eq!(m.adapter_label("one-too-many"), "other");
        assert_eq!(m.adapter_label("a0"), "a0");
    }

    #[test]
    fn one_tenant_cannot_use_up_the_labels() {
        let m = Metrics::new();
        for i in 0..100 {
            let label = m.adapter_label(&format!("greedy/a{i}"));
            let expected = if i < PER_TENANT_LABELS {
                format!("greedy/a{i}")
            } else {
                "greedy/other".into()
            };
            assert_eq!(label, expected);
        }
        assert_eq!(m.adapter_label("modest/x"), "modest/x");
        assert_eq!(m.adapter_label("public"), "public");
    }

    #[test]
    fn renders_text_format_with_lora_info() {
        let m = Metrics::new();
        m.set_lora_info(4, vec!["x".into(), "y".into()], vec![]);
        m.requests
            .with_label_values(&["/v1/chat/completions", "200"])
            .inc();
        let text = m.render();
        assert!(text.contains("loraplex_lora_requests_info{max_lora=\"4\",running_lora_adapters=\"x,y\",waiting_lora_adapters=\"\"}"), "{text}");
        assert!(text
            .contains("loraplex_requests_total{route=\"/v1/chat/completions\",status=\"200\"} 1"));
    }

    #[test]
    fn adapters_loading_for_their_requests_are_waiting_not_running() {
        let m = std::sync::Arc::new(Metrics::new());
        m.set_lora_info(4, vec!["x".into()], vec!["y".into()]);
        let info = |m: &Metrics| {
            let text = m.render();
            text.lines()
                .find(|l| l.starts_with("loraplex_lora_requests_info{"))
                .unwrap()
                .to_string()
        };
        let a = m.loading("z");
        let b = m.loading("a");
        let again = m.loading("z");
        assert!(
            info(&m).contains("running_lora_adapters=\"x\",waiting_lora_adapters=\"a,y,z\""),
            "{}",
            info(&m)
        );
        drop((a, b));
        // The engine's next step keeps the loading adapter that is still loading.
        m.set_lora_info(4, vec!["x".into()], vec![]);
        assert!(
            info(&m).contains("running_lora_adapters=\"x\",waiting_lora_adapters=\"z\""),
            "{}",
            info(&m)
        );
        drop(again);
        assert!(
            info(&m).contains("waiting_lora_adapters=\"\""),
            "{}",
            info(&m)
        );
    }
}
