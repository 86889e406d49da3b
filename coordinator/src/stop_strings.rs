//! Stop strings matched incrementally over streamed text: an Aho–Corasick automaton (Aho &
//! Corasick, "Efficient string matching", CACM 1975) over all of a request's stop strings,
//! fed each new piece once, so a token costs time in its own length whatever the stop strings
//! are (the earlier matcher tried every prefix of every stop string on each token).
//!
//! The automaton is built here rather than taken from the `aho-corasick` crate because the
//! streaming answer needs each state's depth: the longest tail of the text that may still
//! grow into a stop string is held back, everything before it is sent at once.

/// The text of one answer, cut at the first stop string that appears in it.
pub struct StopMatcher {
    automaton: Automaton,
    state: usize,
    pending: String,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            automaton: Automaton::new(&stops),
            state: ROOT,
            pending: String::new(),
        }
    }

    /// Adds a piece of text; returns what can be emitted, and whether a stop string was hit.
    /// A stop string ends the text where it first completes (with several completing at the
    /// same byte, the longest), so the answer does not depend on how the text was split into
    /// pieces.
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        let base = self.pending.len();
        self.pending.push_str(piece);
        for (i, byte) in piece.bytes().enumerate() {
            self.state = self.automaton.next(self.state, byte);
            let matched = self.automaton.states[self.state].longest_match;
            if matched > 0 {
                let start = base + i + 1 - matched;
                let out = self.pending[..start].to_string();
                self.pending.clear();
                self.state = ROOT;
                return (out, true);
            }
        }
        // The state's depth is the longest tail that begins a stop string. It starts at a
        // character boundary: the stop string's first byte is not a continuation byte.
        let keep = self.automaton.states[self.state].depth;
        let cut = self.pending.len() - keep;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }

    /// Whatever was held back, at the end of generation.
    pub fn flush(&mut self) -> String {
        self.state = ROOT;
        std::mem::take(&mut self.pending)
    }
}

const ROOT: usize = 0;

struct State {
    /// Edges of the trie of stop strings, by byte (few per state: a sorted list is enough).
    next: Vec<(u8, usize)>,
    /// The state of the longest proper suffix of this state's string that is in the trie.
    fail: usize,
    /// Length of this state's string.
    depth: usize,
    /// Length of the longest stop string that is a suffix of this state's string (0: none).
    longest_match: usize,
}

struct Automaton {
    states: Vec<State>,
}

impl Automaton {
    fn new(stops: &[String]) -> Self {
        let mut states = vec![State {
            next: Vec::new(),
            fail: ROOT,
            depth: 0,
            longest_match: 0,
        }];
        for stop in stops.iter().filter(|s| !s.is_empty()) {
            let mut at = ROOT;
            for &byte in stop.as_bytes() {
                at = match edge(&states[at].next, byte) {
                    Some(to) => to,
                    None => {
                        let to = states.len();
                        let depth = states[at].depth + 1;
                        states.push(State {
                            next: Vec::new(),
                            fail: ROOT,
                            depth,
                            longest_match: 0,
                        });
                        let edges = &mut states[at].next;
                        let slot = edges.partition_point(|&(b, _)| b < byte);
                        edges.insert(slot, (byte, to));
                        to
                    }
                };
            }
            states[at].longest_match = stop.len();
        }
        // Failure links breadth first: a state's suffixes are shallower, so done before it.
        let mut queue = std::collections::VecDeque::from(
            states[ROOT]
                .next
                .iter()
                .map(|&(_, s)| s)
                .collect::<Vec<_>>(),
        );
        while let Some(parent) = queue.pop_front() {
            for (byte, child) in states[parent].next.clone() {
                let mut f = states[parent].fail;
                let fail = loop {
                    if let Some(to) = edge(&states[f].next, byte) {
                        break to;
                    }
                    if f == ROOT {
                        break ROOT;
                    }
                    f = states[f].fail;
                };
                states[child].fail = fail;
                states[child].longest_match =
                    states[child].longest_match.max(states[fail].longest_match);
                queue.push_back(child);
            }
        }
        Self { states }
    }

    fn next(&self, mut state: usize, byte: u8) -> usize {
        loop {
            if let Some(to) = edge(&self.states[state].next, byte) {
                return to;
            }
            if state == ROOT {
                return ROOT;
            }
            state = self.states[state].fail;
        }
    }
}

fn edge(edges: &[(u8, usize)], byte: u8) -> Option<usize> {
    edges
        .binary_search_by_key(&byte, |&(b, _)| b)
        .ok()
        .map(|i| edges[i].1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_split_across_pieces() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("abc E"), ("abc ".to_string(), false));
        assert_eq!(m.push("N"), (String::new(), false));
        assert_eq!(m.push("D tail"), (String::new(), true));
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("xE"), ("x".to_string(), false));
        assert_eq!(m.push("y"), ("Ey".to_string(), false));
        assert_eq!(m.flush(), "");
    }

    /// The text before the first stop string, found the slow way: the earliest end, then the
    /// longest string ending there.
    fn reference(text: &str, stops: &[&str]) -> Option<String> {
        (1..=text.len()).find_map(|end| {
            stops
                .iter()
                .filter(|s| text.as_bytes()[..end].ends_with(s.as_bytes()))
                .map(|s| s.len())
                .max()
                .map(|len| text[..end - len].to_string())
        })
    }

    #[test]
    fn any_split_of_the_text_gives_the_reference_answer() {
        let stops = ["abcd", "bc", "cab", "é!", "ab"];
        let texts = [
            "xxabcd",
            "cacab",
            "zzé!é",
            "abab",
            "no stop here",
            "bbcab",
            "aé",
        ];
        for text in texts {
            let expected = reference(text, &stops);
            let chars: Vec<(usize, char)> = text.char_indices().collect();
            // Every split into two pieces, and one piece per character.
            let mut splits: Vec<Vec<&str>> = chars
                .iter()
                .map(|&(i, _)| vec![&text[..i], &text[i..]])
                .collect();
            splits.push(
                chars
                    .iter()
                    .map(|&(i, c)| &text[i..i + c.len_utf8()])
                    .collect(),
            );
            for pieces in splits {
                let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
                let (mut out, mut stopped) = (String::new(), false);
                for p in &pieces {
                    let (o, s) = m.push(p);
                    out.push_str(&o);
                    if s {
                        stopped = true;
                        break;
                    }
                }
                if !stopped {
                    out.push_str(&m.flush());
                }
                match &expected {
                    Some(before) => {
                        assert!(stopped && &out == before, "{text:?} {pieces:?}: {out:?}")
                    }
                    None => assert!(!stopped && out == text, "{text:?} {pieces:?}: {out:?}"),
                }
            }
        }
    }

    #[test]
    fn only_a_possible_start_of_a_stop_string_is_held_back() {
        let mut m = StopMatcher::new(vec!["<|x|>".into(), "ab".into()]);
        assert_eq!(m.push("hello <|"), ("hello ".to_string(), false));
        assert_eq!(m.push("y"), ("<|y".to_string(), false));
        assert_eq!(m.push("a"), (String::new(), false));
        assert_eq!(m.push("c"), ("ac".to_string(), false));
    }
}
