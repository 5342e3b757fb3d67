//! Stop strings over streamed text: find the first stop string, and hold back any tail that
//! could still grow into one, so streamed text never shows a stop string.

#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
        }
    }

    /// Byte offset of the earliest stop string in `text`, searching from `from` (minus the
    /// longest stop, so a match straddling the boundary is found).
    pub fn find(&self, text: &str, from: usize) -> Option<usize> {
        let longest = self.stops.iter().map(String::len).max()?;
        let mut start = from.saturating_sub(longest);
        while !text.is_char_boundary(start) {
            start -= 1;
        }
        self.stops
            .iter()
            .filter_map(|s| text[start..].find(s.as_str()).map(|i| start + i))
            .min()
    }

    /// How much of `text` is safe to emit: everything before a suffix that is a proper prefix
    /// of some stop string.
    pub fn safe_len(&self, text: &str) -> usize {
        let mut safe = text.len();
        for (i, _) in text
            .char_indices()
            .rev()
            .take(self.stops.iter().map(String::len).max().unwrap_or(0))
        {
            let tail = &text[i..];
            if self
                .stops
                .iter()
                .any(|s| s.len() > tail.len() && s.starts_with(tail))
            {
                safe = i;
            }
        }
        safe
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_across_chunk_boundaries() {
        let m = StopMatcher::new(&["END".to_string(), "\n\n".to_string()]);
        assert_eq!(m.find("abc EN", 4), None);
        assert_eq!(m.find("abc END more", 6), Some(4));
        assert_eq!(m.find("x\n\ny END", 0), Some(1));
    }

    #[test]
    fn holds_back_possible_prefixes() {
        let m = StopMatcher::new(&["END".to_string()]);
        assert_eq!(m.safe_len("hello E"), 6);
        assert_eq!(m.safe_len("hello EN"), 6);
        assert_eq!(m.safe_len("hello"), 5);
        assert_eq!(StopMatcher::new(&[]).safe_len("abc"), 3);
        let u = StopMatcher::new(&["é!".to_string()]);
        assert_eq!(u.safe_len("caf é"), 4);
    }
}
