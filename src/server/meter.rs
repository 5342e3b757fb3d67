//! One request's meter: sees its events as they go out to the client, counts the tokens
//! served against the tenant's rate limit as they are served, and when the request ends
//! (answered, failed or abandoned) books its usage (the ledger and the admin-only metrics).
//! What it books is what the client was told: the `usage` the response carries.

use std::sync::Arc;

use super::rate_limit::Permit;
use super::usage::{Usage, UsageLedger};
use crate::engine::Event;
use crate::metrics::Metrics;

pub struct Meter {
    permit: Option<Permit>,
    ledger: Arc<UsageLedger>,
    metrics: Arc<Metrics>,
    tenant: String,
    /// The adapter's bounded metrics label ("" for the base model).
    adapter: String,
    prompt_len: usize,
    prompt_counted: bool,
    completion: u64,
    cached: u64,
}

impl Meter {
    pub fn new(
        permit: Option<Permit>,
        ledger: Arc<UsageLedger>,
        metrics: Arc<Metrics>,
        tenant: &str,
        adapter: &str,
        prompt_len: usize,
    ) -> Self {
        Self {
            permit,
            ledger,
            metrics,
            tenant: tenant.to_string(),
            adapter: adapter.to_string(),
            prompt_len,
            prompt_counted: false,
            completion: 0,
            cached: 0,
        }
    }

    fn prompt_served(&mut self) {
        if !self.prompt_counted {
            self.prompt_counted = true;
            if let Some(p) = &mut self.permit {
                p.served(self.prompt_len as u64);
            }
        }
    }

    /// Choice `index`'s event on its way out.
    pub fn observe(&mut self, index: usize, ev: &Event) {
        match ev {
            Event::Token { .. } => {
                self.prompt_served();
                self.completion += 1;
                if let Some(p) = &mut self.permit {
                    p.served(1);
                }
            }
            Event::Done { cached_tokens, .. } => {
                self.prompt_served();
                if index == 0 {
                    self.cached = *cached_tokens as u64;
                }
            }
            Event::Error(_) | Event::Aborted(_) => {}
        }
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        if !self.prompt_counted {
            return; // nothing was served
        }
        let usage = Usage {
            prompt_tokens: self.prompt_len as u64,
            completion_tokens: self.completion,
            cached_tokens: self.cached,
            requests: 1,
        };
        self.ledger
            .record(&self.tenant, &self.adapter, usage, super::state::unix_now());
        let labels = [self.tenant.as_str(), self.adapter.as_str()];
        let m = &self.metrics;
        m.usage_requests.with_label_values(&labels).inc();
        for (kind, n) in [
            ("prompt", usage.prompt_tokens),
            ("completion", usage.completion_tokens),
            ("cached", usage.cached_tokens),
        ] {
            m.usage_tokens
                .with_label_values(&[labels[0], labels[1], kind])
                .inc_by(n);
        }
    }
}
