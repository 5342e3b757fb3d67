//! Rate limits per tenant (`tokens_per_minute`, `requests_per_minute`,
//! `max_concurrent_requests` in the keys file), over a sliding 60-second window.
//!
//! Tokens are counted as they are served (prompt tokens when the prompt has been read, each
//! generated token as it goes out). A request is let in only if the tokens served in the last
//! 60 s, plus what requests in flight may still take (their prompt + `max_tokens` estimate, less
//! what they were already counted), plus its own estimate, stay within the limit: so no 60-second
//! window ever holds more than `tokens_per_minute`, however much is offered. Past a limit: 429
//! with the limit named and when to retry. Pure state with explicit clocks (unit-tested alone);
//! `RateLimiter` puts it behind a lock and a monotonic clock for the server.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::auth::RateLimits;

const WINDOW: f64 = 60.0;

/// Which limit refused a request.
#[derive(Debug, Clone, PartialEq)]
pub struct Limited {
    /// `tokens`, `requests` or `concurrent_requests`.
    pub limit: &'static str,
    pub message: String,
    /// Seconds until a retry can succeed (at least 1).
    pub retry_after: u64,
}

/// What a successful response reports (`x-ratelimit-*`), for the limits that are set.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Standing {
    pub limit_requests: Option<u64>,
    pub remaining_requests: u64,
    pub reset_requests: f64,
    pub limit_tokens: Option<u64>,
    pub remaining_tokens: u64,
    pub reset_tokens: f64,
}

#[derive(Debug, Default)]
struct Window {
    /// (second, tokens served in it), oldest first.
    tokens: VecDeque<(u64, u64)>,
    /// Start times of requests let in.
    requests: VecDeque<f64>,
    in_flight: u64,
    /// Tokens that requests in flight may still be counted for.
    reserved: u64,
}

impl Window {
    fn expire(&mut self, now: f64) {
        let since = now - WINDOW;
        while self
            .tokens
            .front()
            .is_some_and(|&(s, _)| (s as f64) + 1.0 <= since)
        {
            self.tokens.pop_front();
        }
        while self.requests.front().is_some_and(|&t| t <= since) {
            self.requests.pop_front();
        }
    }

    fn served(&self) -> u64 {
        self.tokens.iter().map(|(_, n)| n).sum()
    }

    fn idle(&self) -> bool {
        self.tokens.is_empty() && self.requests.is_empty() && self.in_flight == 0
    }

    /// Seconds until `need` more tokens fit: old seconds leave the window in turn.
    fn tokens_fit_in(&self, limit: u64, need: u64, now: f64) -> f64 {
        let mut used = self.served() + self.reserved;
        for &(s, n) in &self.tokens {
            if used + need <= limit {
                break;
            }
            used -= n;
            if used + need <= limit {
                return (s as f64 + 1.0 + WINDOW - now).max(0.0);
            }
        }
        // What is in flight must end first.
        1.0
    }
}

/// The limits' state for every tenant, on explicit clocks (seconds).
#[derive(Debug, Default)]
pub struct Limits {
    tenants: HashMap<String, Window>,
}

/// A request let in: what it reserved (`Limits::release` when it ends).
#[derive(Debug)]
pub struct Grant {
    tenant: String,
    reserved: u64,
}

impl Limits {
    /// Lets a request of `tenant` in, estimated at `estimate` tokens, or says which limit
    /// refuses it.
    pub fn admit(
        &mut self,
        tenant: &str,
        limits: &RateLimits,
        estimate: u64,
        now: f64,
    ) -> Result<Grant, Limited> {
        let w = self.tenants.entry(tenant.to_string()).or_default();
        w.expire(now);
        if let Some(max) = limits.max_concurrent_requests {
            if w.in_flight >= max {
                return Err(Limited {
                    limit: "concurrent_requests",
                    message: format!(
                        "Rate limit reached for tenant `{tenant}` on concurrent requests: limit {max}, in flight {}. Retry when one has finished.",
                        w.in_flight
                    ),
                    retry_after: 1,
                });
            }
        }
        if let Some(rpm) = limits.requests_per_minute {
            if w.requests.len() as u64 >= rpm {
                let oldest = w.requests[w.requests.len() - rpm as usize];
                let after = oldest + WINDOW - now;
                return Err(Limited {
                    limit: "requests",
                    message: format!(
                        "Rate limit reached for tenant `{tenant}` on requests per minute (RPM): limit {rpm}, used {}. Please try again in {after:.1}s.",
                        w.requests.len()
                    ),
                    retry_after: seconds(after),
                });
            }
        }
        if let Some(tpm) = limits.tokens_per_minute {
            if estimate > tpm {
                return Err(Limited {
                    limit: "tokens",
                    message: format!(
                        "Request too large for tenant `{tenant}` on tokens per minute (TPM): limit {tpm}, requested {estimate} (the prompt and `max_tokens`). Send a shorter prompt or a smaller `max_tokens`."
                    ),
                    retry_after: WINDOW as u64,
                });
            }
            let used = w.served() + w.reserved;
            if used + estimate > tpm {
                let after = w.tokens_fit_in(tpm, estimate, now);
                return Err(Limited {
                    limit: "tokens",
                    message: format!(
                        "Rate limit reached for tenant `{tenant}` on tokens per minute (TPM): limit {tpm}, used {used}, requested {estimate}. Please try again in {after:.1}s."
                    ),
                    retry_after: seconds(after),
                });
            }
        }
        w.requests.push_back(now);
        w.in_flight += 1;
        w.reserved += estimate;
        Ok(Grant {
            tenant: tenant.to_string(),
            reserved: estimate,
        })
    }

    /// `n` tokens of `grant`'s request were served at `now`.
    pub fn served(&mut self, grant: &mut Grant, n: u64, now: f64) {
        let w = self.tenants.entry(grant.tenant.clone()).or_default();
        let second = now.max(0.0) as u64;
        match w.tokens.back_mut() {
            Some((s, count)) if *s == second => *count += n,
            _ => w.tokens.push_back((second, n)),
        }
        let covered = n.min(grant.reserved);
        grant.reserved -= covered;
        w.reserved -= covered;
    }

    /// `grant`'s request ended: what it reserved and did not use goes back.
    pub fn release(&mut self, grant: &mut Grant, now: f64) {
        if let Some(w) = self.tenants.get_mut(&grant.tenant) {
            w.reserved -= grant.reserved;
            w.in_flight = w.in_flight.saturating_sub(1);
            w.expire(now);
            if w.idle() {
                self.tenants.remove(&grant.tenant);
            }
        }
        grant.reserved = 0;
    }

    /// Where `tenant` stands against `limits` (for the `x-ratelimit-*` headers).
    pub fn standing(&mut self, tenant: &str, limits: &RateLimits, now: f64) -> Standing {
        let w = self.tenants.entry(tenant.to_string()).or_default();
        w.expire(now);
        let mut s = Standing {
            limit_requests: limits.requests_per_minute,
            limit_tokens: limits.tokens_per_minute,
            ..Standing::default()
        };
        if let Some(rpm) = limits.requests_per_minute {
            s.remaining_requests = rpm.saturating_sub(w.requests.len() as u64);
            s.reset_requests = w
                .requests
                .front()
                .map_or(0.0, |t| (t + WINDOW - now).max(0.0));
        }
        if let Some(tpm) = limits.tokens_per_minute {
            s.remaining_tokens = tpm.saturating_sub(w.served() + w.reserved);
            s.reset_tokens = w
                .tokens
                .front()
                .map_or(0.0, |&(t, _)| (t as f64 + 1.0 + WINDOW - now).max(0.0));
        }
        s
    }
}

fn seconds(s: f64) -> u64 {
    (s.ceil() as u64).max(1)
}

/// OpenAI's duration form for `x-ratelimit-reset-*`: `1s`, `6m0s`, `250ms`.
pub fn duration_text(s: f64) -> String {
    if s < 1.0 {
        return format!("{}ms", (s * 1000.0).round() as u64);
    }
    let whole = s.ceil() as u64;
    match whole / 60 {
        0 => format!("{whole}s"),
        m => format!("{m}m{}s", whole % 60),
    }
}

/// The limits behind a lock, on the server's monotonic clock.
pub struct RateLimiter {
    start: Instant,
    state: Mutex<Limits>,
}

impl Default for RateLimiter {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            state: Mutex::new(Limits::default()),
        }
    }
}

impl RateLimiter {
    fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// Lets a request in (`Ok(None)` when the tenant has no limits), or refuses it.
    pub fn admit(
        self: &Arc<Self>,
        tenant: &str,
        limits: &RateLimits,
        estimate: u64,
    ) -> Result<Option<Permit>, Limited> {
        if *limits == RateLimits::default() {
            return Ok(None);
        }
        let now = self.now();
        let grant = self
            .state
            .lock()
            .expect("rate limits lock")
            .admit(tenant, limits, estimate, now)?;
        Ok(Some(Permit {
            limiter: self.clone(),
            grant,
        }))
    }

    pub fn standing(&self, tenant: &str, limits: &RateLimits) -> Standing {
        let now = self.now();
        self.state
            .lock()
            .expect("rate limits lock")
            .standing(tenant, limits, now)
    }
}

/// A request's hold on its tenant's limits: counts tokens as they are served; dropping it ends
/// the request.
pub struct Permit {
    limiter: Arc<RateLimiter>,
    grant: Grant,
}

impl Permit {
    pub fn served(&mut self, n: u64) {
        let now = self.limiter.now();
        self.limiter
            .state
            .lock()
            .expect("rate limits lock")
            .served(&mut self.grant, n, now);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let now = self.limiter.now();
        if let Ok(mut s) = self.limiter.state.lock() {
            s.release(&mut self.grant, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tpm(n: u64) -> RateLimits {
        RateLimits {
            tokens_per_minute: Some(n),
            ..RateLimits::default()
        }
    }

    #[test]
    fn no_sixty_second_window_exceeds_the_token_limit_at_ten_times_the_load() {
        // 1,000 tokens a minute; clients offer 10,000 (requests of 100 estimated, 80 served,
        // each taking 2 s), for 5 minutes on a clock of 0.1 s steps.
        let limits = tpm(1000);
        let mut l = Limits::default();
        let mut served: Vec<(f64, u64)> = Vec::new();
        let mut flight: Vec<(Grant, f64)> = Vec::new();
        let mut refused = 0;
        for step in 0..3000 {
            let now = step as f64 * 0.1;
            // Offered: 100 requests a minute of 100 tokens (10x).
            if step % 6 == 0 {
                match l.admit("a", &limits, 100, now) {
                    Ok(g) => flight.push((g, now)),
                    Err(e) => {
                        assert_eq!(e.limit, "tokens");
                        assert!(e.retry_after >= 1 && e.retry_after <= 61, "{e:?}");
                        refused += 1;
                    }
                }
            }
            let mut i = 0;
            while i < flight.len() {
                if now - flight[i].1 >= 2.0 {
                    let (mut g, _) = flight.swap_remove(i);
                    l.served(&mut g, 80, now);
                    served.push((now, 80));
                    l.release(&mut g, now);
                } else {
                    i += 1;
                }
            }
        }
        assert!(
            refused > 200,
            "the load was 10x the limit: {refused} refused"
        );
        let mut worst = 0;
        for &(t0, _) in &served {
            let in_window: u64 = served
                .iter()
                .filter(|(t, _)| *t >= t0 && *t < t0 + WINDOW)
                .map(|(_, n)| n)
                .sum();
            worst = worst.max(in_window);
        }
        assert!(worst <= 1000, "a 60 s window held {worst} tokens");
        let total: u64 = served.iter().map(|(_, n)| n).sum();
        // Over 300 s at most 5 windows' worth; the limit is also used, not starved.
        assert!(total >= 3500, "served {total}");
    }

    #[test]
    fn requests_concurrency_and_size_are_limited_and_say_when_to_retry() {
        let limits = RateLimits {
            tokens_per_minute: Some(500),
            requests_per_minute: Some(3),
            max_concurrent_requests: Some(2),
        };
        let mut l = Limits::default();
        let mut a = l.admit("t", &limits, 10, 0.0).unwrap();
        let _b = l.admit("t", &limits, 10, 1.0).unwrap();
        let e = l.admit("t", &limits, 10, 2.0).unwrap_err();
        assert_eq!(e.limit, "concurrent_requests");
        l.release(&mut a, 3.0);
        let _c = l.admit("t", &limits, 10, 4.0).unwrap();
        let e = l.admit("t", &limits, 10, 5.0).unwrap_err();
        assert_eq!(e.limit, "concurrent_requests");
        let e = l
            .admit(
                "t",
                &RateLimits {
                    max_concurrent_requests: None,
                    ..limits
                },
                10,
                5.0,
            )
            .unwrap_err();
        assert_eq!((e.limit, e.retry_after), ("requests", 55));
        let e = l.admit("u", &limits, 501, 0.0).unwrap_err();
        assert!(e.message.contains("Request too large"), "{}", e.message);
        // Another tenant is not touched by the first one's use.
        assert!(l.admit("u", &limits, 10, 5.0).is_ok());
        let s = l.standing("t", &limits, 5.0);
        assert_eq!((s.remaining_requests, s.remaining_tokens), (0, 480));
        // Retry-After is honest: at that time the same request fits.
        let mut l = Limits::default();
        let mut g = l.admit("v", &tpm(100), 60, 10.0).unwrap();
        l.served(&mut g, 60, 10.5);
        l.release(&mut g, 10.5);
        let e = l.admit("v", &tpm(100), 60, 30.0).unwrap_err();
        assert_eq!(e.retry_after, 41);
        assert!(l.admit("v", &tpm(100), 60, 30.0 + 40.5).is_err());
        assert!(l.admit("v", &tpm(100), 60, 30.0 + 41.0).is_ok());
        assert_eq!(duration_text(0.25), "250ms");
        assert_eq!(duration_text(59.2), "1m0s");
        assert_eq!(duration_text(7.0), "7s");
    }
}
