//! OpenAI's list pages (`?after=ID&limit=N`, `has_more`, `first_id`, `last_id`) for the
//! server's lists: models and adapters by name, fine-tuning jobs, events and checkpoints newest
//! first.

use serde_json::json;

/// The query of a paged list.
#[derive(serde::Deserialize, Clone, Default)]
pub struct Page {
    pub after: Option<String>,
    pub limit: Option<usize>,
}

impl Page {
    /// Whether the request asked for a page at all.
    pub fn paged(&self) -> bool {
        self.after.is_some() || self.limit.is_some()
    }

    /// The positions in `ids` of this page of a model or adapter list, and whether more
    /// follow; `ids` past the first `lead` (the base model, in `/v1/models`) are sorted.
    /// Unpaged: all of them. `after` need not be listed (it may have been removed since): the
    /// page starts at the first sorted id past it.
    pub fn window(&self, ids: &[String], lead: usize) -> (std::ops::Range<usize>, bool) {
        if !self.paged() {
            return (0..ids.len(), false);
        }
        let start = match &self.after {
            Some(a) => match ids.iter().position(|i| i == a) {
                Some(i) => i + 1,
                None => ids
                    .iter()
                    .skip(lead)
                    .position(|i| i.as_str() > a.as_str())
                    .map_or(ids.len(), |i| i + lead),
            },
            None => 0,
        };
        let start = start.min(ids.len());
        let end = (start + self.limit.unwrap_or(100).clamp(1, 1000)).min(ids.len());
        (start..end, end < ids.len())
    }

    /// An OpenAI list of `data`, with the page's fields where one was asked for.
    pub fn list(&self, data: Vec<serde_json::Value>, more: bool) -> serde_json::Value {
        if !self.paged() {
            return json!({"object": "list", "data": data});
        }
        let key =
            |d: Option<&serde_json::Value>| d.map(|d| d.get("id").unwrap_or(&d["name"]).clone());
        let (first, last) = (key(data.first()), key(data.last()));
        json!({"object": "list", "data": data, "has_more": more, "first_id": first, "last_id": last})
    }
}

/// One page of `items` (oldest first, each with an `id`) as an OpenAI list, newest first:
/// `limit` (default 20) after the item `after`.
pub fn newest_first(mut items: Vec<serde_json::Value>, page: &Page) -> serde_json::Value {
    items.reverse();
    let start = match &page.after {
        Some(a) => items
            .iter()
            .position(|e| e["id"] == a.as_str())
            .map_or(items.len(), |i| i + 1),
        None => 0,
    };
    let limit = page.limit.unwrap_or(20).clamp(1, 1000);
    let data: Vec<serde_json::Value> = items.iter().skip(start).take(limit).cloned().collect();
    let has_more = items.len() > start + data.len();
    let (first, last) = (
        data.first().map(|d| d["id"].clone()),
        data.last().map(|d| d["id"].clone()),
    );
    json!({"object": "list", "data": data, "has_more": has_more, "first_id": first, "last_id": last})
}
