//! Maps YAML paths (`pools.content.backends[1].address`) to the line they start on, so errors
//! found after parsing can still point at the file.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// Line numbers (1-based) of every mapping key and sequence item in a document.
#[derive(Debug, Default)]
pub struct LineIndex {
    lines: HashMap<String, usize>,
    duplicates: Vec<(String, usize, usize)>,
}

impl LineIndex {
    /// Indexes `text`. A document the scanner rejects gives an empty index; serde reports the
    /// syntax error itself.
    pub fn new(text: &str) -> Self {
        let mut walker = Walker::default();
        let mut parser = Parser::new_from_str(text);
        if parser.load(&mut walker, false).is_err() {
            return Self::default();
        }
        Self {
            lines: walker.lines,
            duplicates: walker.duplicates,
        }
    }

    /// Keys given twice in one mapping: path, line of the repeat, line of the first.
    pub fn duplicates(&self) -> &[(String, usize, usize)] {
        &self.duplicates
    }

    /// The line of `path`, or of its closest ancestor the index knows.
    pub fn line(&self, path: &str) -> Option<usize> {
        let mut path = path;
        loop {
            if let Some(line) = self.lines.get(path) {
                return Some(*line);
            }
            let cut = path.rfind(['.', '['])?;
            path = &path[..cut];
        }
    }
}

enum Frame {
    Map { key: Option<String> },
    Seq { next: usize },
}

#[derive(Default)]
struct Walker {
    stack: Vec<Frame>,
    path: Vec<String>,
    lines: HashMap<String, usize>,
    duplicates: Vec<(String, usize, usize)>,
}

impl Walker {
    fn joined(&self, last: &str) -> String {
        let mut out = String::new();
        for segment in self.path.iter().map(String::as_str).chain([last]) {
            if !out.is_empty() && !segment.starts_with('[') {
                out.push('.');
            }
            out.push_str(segment);
        }
        out
    }

    /// The segment naming the value node that starts now, under the current frame.
    fn value_segment(&mut self) -> Option<String> {
        match self.stack.last_mut()? {
            Frame::Map { key } => key.take(),
            Frame::Seq { next } => {
                *next += 1;
                Some(format!("[{}]", *next - 1))
            }
        }
    }

    fn record(&mut self, segment: &str, mark: Marker) {
        let path = self.joined(segment);
        self.lines.entry(path).or_insert(mark.line());
    }
}

impl MarkedEventReceiver for Walker {
    fn on_event(&mut self, event: Event, mark: Marker) {
        match event {
            Event::Scalar(text, ..) => {
                if let Some(Frame::Map { key: key @ None }) = self.stack.last_mut() {
                    *key = Some(text.clone());
                    let path = self.joined(&text);
                    if let Some(first) = self.lines.get(&path) {
                        self.duplicates.push((path, mark.line(), *first));
                    }
                    self.record(&text, mark);
                } else if let Some(segment) = self.value_segment() {
                    self.record(&segment, mark);
                }
            }
            Event::Alias(_) => {
                self.value_segment();
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                let segment = self.value_segment();
                if let Some(segment) = segment {
                    self.record(&segment, mark);
                    self.path.push(segment);
                }
                self.stack
                    .push(if matches!(event, Event::MappingStart(..)) {
                        Frame::Map { key: None }
                    } else {
                        Frame::Seq { next: 0 }
                    });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
                if !self.stack.is_empty() {
                    self.path.pop();
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_keys_items_and_flow_mappings() {
        let text = "\
server:
  threads: 2
pools:
  content:
    backends:
      - { address: 127.0.0.1:1, weight: 2 }
      - address: 127.0.0.1:2
routes: [{ name: a, pool: content }]
";
        let index = LineIndex::new(text);
        let cases = [
            ("server", 1),
            ("server.threads", 2),
            ("pools.content", 4),
            ("pools.content.backends[0]", 6),
            ("pools.content.backends[0].weight", 6),
            ("pools.content.backends[1].address", 7),
            ("routes[0].pool", 8),
            ("pools.content.backends[1].nothing", 7),
        ];
        for (path, line) in cases {
            assert_eq!(index.line(path), Some(line), "{path}");
        }
        assert_eq!(index.line("missing"), None);
    }
}
