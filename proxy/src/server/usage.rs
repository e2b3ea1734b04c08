//! Reading a model's answer as it passes: this module owns the incremental
//! scanner of response bodies that finds the token counts an answer
//! reports (OpenAI's `usage`) and the server-sent events of a stream, for
//! the access log and the token and streaming metrics.
//!
//! The scanner is fed each DATA frame as the frame goes on to the client:
//! it never holds a frame back, never collects the body, and keeps at most
//! a fixed look-back ([`WINDOW`], twice that while it trims):
//!
//! - a `text/event-stream` answer is split into events across frame
//!   boundaries (any of the SSE line ends, comments and keep-alives not
//!   counted as events); each event is counted with the time it was
//!   complete, and the `usage` of the last event that has one (not
//!   `null`) is kept: OpenAI's final chunk when the client asked for
//!   `stream_options.include_usage` (or the server sends it anyway), the
//!   Responses API's `response.completed`. Only the tail of an event
//!   longer than the window is looked at;
//! - a whole `application/json` answer has its `usage` read from the last
//!   [`WINDOW`] bytes of the body, where OpenAI-compatible servers put it
//!   (after the choices or the output, which is what grows).
//!
//! In either, `usage` is found by its key: the last `"usage":` in the
//! retained bytes whose value is an object with token counts
//! (`prompt_tokens`/`completion_tokens` of the Chat and Completions APIs,
//! `input_tokens`/`output_tokens` of the Responses and Anthropic APIs),
//! parsed with serde from there. In valid JSON that key cannot stand
//! inside a string (its quotes would be escaped), so a prompt or an answer
//! that talks about usage is not mistaken for it.
//!
//! KServe v2 / Open Inference Protocol answers (Triton, KServe) carry no
//! token counts: they are not scanned, and report none. Neither are gRPC
//! answers, compressed bodies and error answers (nor, decided by the
//! access log, a fan-out's combined answer).

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderMap;
use http::header::{CONTENT_ENCODING, CONTENT_TYPE};
use serde::Deserialize;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};

/// The look-back, in bytes: the most of an event, or of a JSON body's
/// tail, that `usage` is looked for in.
pub(crate) const WINDOW: usize = 16 * 1024;

/// The most a stream keeps allocated between events, in bytes: a larger
/// buffer (for an event larger than this) is released when its event ends.
const SMALL: usize = 4 * 1024;

/// How many `"usage"` keys, from the last, are tried in one look.
const MAX_KEYS: usize = 8;

/// The key looked for.
const KEY: &[u8] = b"\"usage\"";

/// The token counts an answer reported; a count the answer did not give
/// is `None`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    /// Tokens of the prompt: `prompt_tokens` or `input_tokens`.
    pub input: Option<u64>,
    /// Tokens generated: `completion_tokens` or `output_tokens`.
    pub output: Option<u64>,
}

impl Usage {
    /// Whether the answer gave any count.
    pub(crate) fn is_known(&self) -> bool {
        self.input.is_some() || self.output.is_some()
    }

    /// `later` over `self`: a later report replaces the counts it gives
    /// and keeps the others (Anthropic's stream gives the input tokens
    /// first and the output tokens last).
    fn update(&mut self, later: Usage) {
        self.input = later.input.or(self.input);
        self.output = later.output.or(self.output);
    }
}

/// Events a frame completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Dispatched {
    /// How many (at least one).
    pub count: u32,
    /// When the frame came.
    pub at: Instant,
    /// The time since the stream's previous event; `None` when the first
    /// of these is the stream's first event.
    pub gap: Option<Duration>,
}

/// The scanner of one response body.
#[derive(Debug)]
pub(crate) struct Scanner {
    format: Format,
    /// Retained bytes: the current event's from earlier frames, or the
    /// JSON body's tail; at most `2 * WINDOW`.
    tail: Vec<u8>,
    /// The latest JSON frame (at most [`WINDOW`]), referenced rather than
    /// copied: the next frame copies only what of it stays in the window,
    /// and a whole answer in one frame is read in place.
    pending: Option<Bytes>,
    usage: Usage,
}

#[derive(Debug)]
enum Format {
    Events(Events),
    Json,
}

/// Where the SSE parser is, across frames.
#[derive(Debug)]
struct Events {
    /// The next byte starts a line.
    line_start: bool,
    /// The last byte was a `\r` (a `\n` after it ends no other line).
    after_cr: bool,
    /// The first bytes of the current line, and its length so far
    /// (counting on past 5).
    head: [u8; 5],
    line_len: usize,
    /// The current event has a `data` field: it is dispatched at its
    /// blank line (an event of comments or other fields only is not).
    has_data: bool,
    /// Events dispatched.
    count: u64,
    /// When the last one was.
    last: Option<Instant>,
}

impl Scanner {
    /// A scanner for the body of a response with `status` and `headers`
    /// to a request for `path`; `None` when the answer cannot carry
    /// token counts or events (so nothing is allocated or done per frame).
    pub(crate) fn for_response(
        status: http::StatusCode,
        headers: &HeaderMap,
        path: &str,
    ) -> Option<Scanner> {
        if !status.is_success() || crate::core::model::from_path(path).is_some() {
            // Errors have no usage; KServe v2 answers never do.
            return None;
        }
        if headers
            .get(CONTENT_ENCODING)
            .is_some_and(|e| !e.as_bytes().eq_ignore_ascii_case(b"identity"))
        {
            return None;
        }
        let content_type = headers.get(CONTENT_TYPE)?.as_bytes();
        let essence = content_type
            .split(|b| *b == b';')
            .next()
            .unwrap_or_default()
            .trim_ascii();
        let is = |name: &[u8]| essence.eq_ignore_ascii_case(name);
        let json_suffix =
            essence.len() > 5 && essence[essence.len() - 5..].eq_ignore_ascii_case(b"+json");
        let format = if is(b"text/event-stream") {
            Format::Events(Events {
                line_start: true,
                after_cr: false,
                head: [0; 5],
                line_len: 0,
                has_data: false,
                count: 0,
                last: None,
            })
        } else if is(b"application/json") || json_suffix {
            Format::Json
        } else {
            return None;
        };
        Some(Scanner {
            format,
            tail: Vec::new(),
            pending: None,
            usage: Usage::default(),
        })
    }

    /// Reads the next DATA frame. For an event stream, the events it
    /// completed, if any; `now` is asked only then.
    pub(crate) fn feed(
        &mut self,
        data: &Bytes,
        now: impl FnOnce() -> Instant,
    ) -> Option<Dispatched> {
        match &mut self.format {
            Format::Json if data.is_empty() => None,
            Format::Json => {
                // The body's last WINDOW bytes are the end of `tail`, then
                // `pending`. Of what came before this frame, only the
                // bytes that this frame does not push out of the window
                // are copied: none after a frame of a whole window (such
                // as HTTP/2's 16 KiB).
                let keep = WINDOW.saturating_sub(data.len());
                match self.pending.take() {
                    _ if keep == 0 => self.tail.clear(),
                    Some(previous) if previous.len() >= keep => {
                        self.tail.clear();
                        retain(&mut self.tail, &previous[previous.len() - keep..]);
                    }
                    Some(previous) => retain(&mut self.tail, &previous),
                    None => {}
                }
                if data.len() <= WINDOW {
                    // A reference, not a copy.
                    self.pending = Some(data.clone());
                } else {
                    retain(&mut self.tail, last(data));
                }
                None
            }
            Format::Events(events) => {
                let mut count = 0u32;
                let mut start = 0;
                let mut i = 0;
                while i < data.len() {
                    let byte = data[i];
                    if byte != b'\n' && byte != b'\r' {
                        // A line's text, up to its end.
                        let len = data[i..]
                            .iter()
                            .position(|&b| b == b'\n' || b == b'\r')
                            .unwrap_or(data.len() - i);
                        events.text(&data[i..i + len]);
                        i += len;
                        continue;
                    }
                    i += 1;
                    if byte == b'\n' && std::mem::take(&mut events.after_cr) {
                        // The `\n` of a `\r\n`.
                        continue;
                    }
                    events.after_cr = byte == b'\r';
                    if !events.line_start {
                        events.end_line();
                        continue;
                    }
                    // A blank line: the event ends.
                    if std::mem::take(&mut events.has_data) {
                        count += 1;
                        let event = &data[start..i - 1];
                        let found = if self.tail.is_empty() {
                            find_usage(last(event))
                        } else {
                            retain(&mut self.tail, event);
                            find_usage(last(&self.tail))
                        };
                        if let Some(usage) = found {
                            self.usage.update(usage);
                        }
                    }
                    if self.tail.capacity() > SMALL {
                        // A large event is over: its memory is not kept
                        // for the stream's life.
                        self.tail = Vec::new();
                    } else {
                        self.tail.clear();
                    }
                    start = i;
                }
                if start < data.len() {
                    retain(&mut self.tail, &data[start..]);
                }
                if count == 0 {
                    return None;
                }
                let at = now();
                let gap = events.last.map(|last| at.saturating_duration_since(last));
                events.last = Some(at);
                events.count += u64::from(count);
                Some(Dispatched { count, at, gap })
            }
        }
    }

    /// The token counts the answer reported, once its body has ended (or
    /// was cut: then what had come). For a stream, an unfinished last
    /// event is looked at too (though not counted as an event).
    pub(crate) fn finish(&mut self) -> Option<Usage> {
        let found = match &self.format {
            Format::Json => match self.pending.take() {
                Some(whole) if self.tail.is_empty() => find_usage(last(&whole)),
                pending => {
                    if let Some(pending) = pending {
                        retain(&mut self.tail, &pending);
                    }
                    find_usage(last(&self.tail))
                }
            },
            Format::Events(events) if events.has_data || !events.line_start => {
                find_usage(last(&self.tail))
            }
            Format::Events(_) => None,
        };
        self.tail = Vec::new();
        if let Some(usage) = found {
            self.usage.update(usage);
        }
        self.usage.is_known().then_some(self.usage)
    }

    /// The events dispatched so far (0 for a JSON answer).
    #[cfg(test)]
    fn events(&self) -> u64 {
        match &self.format {
            Format::Events(events) => events.count,
            Format::Json => 0,
        }
    }
}

impl Events {
    /// Text of the current line (not its end): its first bytes are kept.
    fn text(&mut self, text: &[u8]) {
        self.after_cr = false;
        if self.line_start {
            self.line_start = false;
            self.line_len = 0;
        }
        if self.line_len < self.head.len() {
            let n = (self.head.len() - self.line_len).min(text.len());
            self.head[self.line_len..self.line_len + n].copy_from_slice(&text[..n]);
        }
        self.line_len += text.len();
    }

    /// A line ended: notes a `data` field (`data` or `data:...`).
    fn end_line(&mut self) {
        if self.line_len >= 4
            && &self.head[..4] == b"data"
            && (self.line_len == 4 || self.head[4] == b':')
        {
            self.has_data = true;
        }
        self.line_start = true;
    }
}

/// The last [`WINDOW`] bytes of `bytes`.
fn last(bytes: &[u8]) -> &[u8] {
    &bytes[bytes.len().saturating_sub(WINDOW)..]
}

/// Appends `more` to `tail`, keeping at least the last [`WINDOW`] bytes
/// and at most twice that (trimming in bulk, so each byte is moved a
/// bounded number of times), and never holding more capacity.
fn retain(tail: &mut Vec<u8>, more: &[u8]) {
    if more.len() >= WINDOW {
        tail.clear();
        tail.extend_from_slice(last(more));
        return;
    }
    if tail.len() + more.len() > 2 * WINDOW {
        let keep = WINDOW - more.len();
        tail.drain(..tail.len() - keep);
    }
    let needed = tail.len() + more.len();
    if needed > tail.capacity() {
        let capacity = (tail.capacity() * 2).clamp(needed, 2 * WINDOW);
        tail.reserve_exact(capacity - tail.len());
    }
    tail.extend_from_slice(more);
}

/// What the value after one `"usage"` key is.
enum Found {
    /// Token counts.
    Usage(Usage),
    /// `null`: this answer or chunk has none.
    Null,
    /// Not a usage: not a key, or not an object of counts.
    Other,
}

/// The counts of the last `"usage"` key in `bytes` that has them; `None`
/// when that key says `null`, or none has counts.
fn find_usage(bytes: &[u8]) -> Option<Usage> {
    let mut end = bytes.len();
    for _ in 0..MAX_KEYS {
        let at = rfind_key(&bytes[..end])?;
        match value_after_key(&bytes[at + KEY.len()..]) {
            Found::Usage(usage) => return Some(usage),
            Found::Null => return None,
            Found::Other => end = at,
        }
    }
    None
}

/// Where the last `"usage"` in `bytes` starts.
///
/// The last few `u`s are tried first: an answer ends with its usage, and
/// the keys after it in OpenAI's shape hold no `u`, so the first `u` from
/// the end is nearly always the key's; memchr finds a byte from the end
/// with vector instructions, where its reverse substring search goes byte
/// by byte (it cost ~370 instructions per answer). Past those tries, the
/// substring search looks at what is left before them (made once:
/// `memmem::rfind` makes one per call, another 650 instructions).
fn rfind_key(bytes: &[u8]) -> Option<usize> {
    /// How many `u`s are tried before the substring search.
    const QUICK_TRIES: usize = 4;
    static FINDER: LazyLock<memchr::memmem::FinderRev<'static>> =
        LazyLock::new(|| memchr::memmem::FinderRev::new(KEY));
    let mut end = bytes.len();
    for _ in 0..QUICK_TRIES {
        // No `u` left: no key either.
        let u = memchr::memrchr(b'u', &bytes[..end])?;
        if u > 0 && bytes[u - 1..].starts_with(KEY) {
            return Some(u - 1);
        }
        // A key that reaches past `u` would have its `u` there: none does.
        end = u;
    }
    FINDER.rfind(&bytes[..end])
}

/// The counts in OpenAI's and Anthropic's `usage` objects; other fields
/// (totals, details) are skipped. Read by hand rather than derived: the
/// derived reader checks every key is UTF-8 before comparing it, which
/// was a third of the cost of reading an answer's usage; here the keys
/// are compared as bytes. (A key given twice counts as given last.)
#[derive(Default)]
struct Counts {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
}

impl<'de> Deserialize<'de> for Counts {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(CountsVisitor)
    }
}

struct CountsVisitor;

impl<'de> Visitor<'de> for CountsVisitor {
    type Value = Counts;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a usage object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Counts, A::Error> {
        let mut counts = Counts::default();
        while let Some(key) = map.next_key::<CountKey>()? {
            let count = match key {
                CountKey::PromptTokens => &mut counts.prompt_tokens,
                CountKey::CompletionTokens => &mut counts.completion_tokens,
                CountKey::InputTokens => &mut counts.input_tokens,
                CountKey::OutputTokens => &mut counts.output_tokens,
                CountKey::Other => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            *count = map.next_value()?;
        }
        Ok(counts)
    }
}

/// A key of a `usage` object, read as bytes.
enum CountKey {
    PromptTokens,
    CompletionTokens,
    InputTokens,
    OutputTokens,
    Other,
}

impl<'de> Deserialize<'de> for CountKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_bytes(CountKeyVisitor)
    }
}

struct CountKeyVisitor;

impl Visitor<'_> for CountKeyVisitor {
    type Value = CountKey;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a key")
    }

    fn visit_bytes<E: serde::de::Error>(self, key: &[u8]) -> Result<CountKey, E> {
        Ok(match key {
            b"prompt_tokens" => CountKey::PromptTokens,
            b"completion_tokens" => CountKey::CompletionTokens,
            b"input_tokens" => CountKey::InputTokens,
            b"output_tokens" => CountKey::OutputTokens,
            _ => CountKey::Other,
        })
    }

    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<CountKey, E> {
        self.visit_bytes(key.as_bytes())
    }
}

/// Reads the value after a `"usage"` key: `rest` starts right after it.
fn value_after_key(rest: &[u8]) -> Found {
    let skip = |bytes: &[u8]| bytes.iter().take_while(|b| b.is_ascii_whitespace()).count();
    let rest = &rest[skip(rest)..];
    let Some(rest) = rest.strip_prefix(b":") else {
        return Found::Other;
    };
    let rest = &rest[skip(rest)..];
    // One value is read; what follows it (the rest of the answer) is not.
    let mut parser = serde_json::Deserializer::from_slice(rest);
    match Option::<Counts>::deserialize(&mut parser) {
        Ok(None) => Found::Null,
        Ok(Some(counts)) => {
            let usage = Usage {
                input: counts.prompt_tokens.or(counts.input_tokens),
                output: counts.completion_tokens.or(counts.output_tokens),
            };
            if usage.is_known() {
                Found::Usage(usage)
            } else {
                Found::Other
            }
        }
        Err(_) => Found::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    fn scanner(content_type: &str) -> Scanner {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, content_type.parse().unwrap());
        Scanner::for_response(StatusCode::OK, &headers, "/v1/chat/completions").unwrap()
    }

    /// Feeds `frames`; the events each completed.
    fn feed(scanner: &mut Scanner, frames: &[&[u8]]) -> Vec<u32> {
        frames
            .iter()
            .map(|f| {
                scanner
                    .feed(&Bytes::copy_from_slice(f), Instant::now)
                    .map_or(0, |d| d.count)
            })
            .collect()
    }

    fn chunk(i: usize) -> String {
        format!(
            "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"token{i} \"}}}}],\"usage\":null}}\n\n"
        )
    }

    const USAGE_CHUNK: &str = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":17,\"completion_tokens\":5,\"total_tokens\":22,\"prompt_tokens_details\":{\"cached_tokens\":0}}}\n\n";

    fn openai_stream() -> String {
        let mut text: String = (0..5).map(chunk).collect();
        text.push_str(": keep-alive\n\n");
        text.push_str(USAGE_CHUNK);
        text.push_str("data: [DONE]\n\n");
        text
    }

    #[test]
    fn events_split_across_frames_at_every_byte_are_read_the_same() {
        let text = openai_stream();
        let bytes = text.as_bytes();
        let want = Some(Usage {
            input: Some(17),
            output: Some(5),
        });
        for split in 0..=bytes.len() {
            let mut s = scanner("text/event-stream");
            let counts = feed(&mut s, &[&bytes[..split], &bytes[split..]]);
            assert_eq!(counts.iter().sum::<u32>(), 7, "split at {split}");
            assert_eq!(s.events(), 7, "split at {split}");
            assert_eq!(s.finish(), want, "split at {split}");
        }
        // And one byte per frame.
        let mut s = scanner("text/event-stream");
        let frames: Vec<&[u8]> = bytes.chunks(1).collect();
        let counts = feed(&mut s, &frames);
        assert_eq!(counts.iter().sum::<u32>(), 7);
        assert_eq!(
            counts.iter().filter(|c| **c > 0).count(),
            7,
            "one per frame"
        );
        assert_eq!(s.finish(), want);
    }

    #[test]
    fn every_line_end_of_the_sse_format_ends_events() {
        for end in ["\n", "\r\n", "\r"] {
            let text = openai_stream().replace('\n', end);
            let bytes = text.as_bytes();
            for split in 0..=bytes.len() {
                let mut s = scanner("text/event-stream; charset=utf-8");
                let counts = feed(&mut s, &[&bytes[..split], &bytes[split..]]);
                assert_eq!(counts.iter().sum::<u32>(), 7, "{end:?} split at {split}");
                assert_eq!(
                    s.finish().and_then(|u| u.output),
                    Some(5),
                    "{end:?} split at {split}"
                );
            }
        }
    }

    #[test]
    fn events_carry_their_times_and_gaps() {
        let mut s = scanner("text/event-stream");
        let t0 = Instant::now();
        let first = s.feed(&Bytes::from(chunk(0) + &chunk(1)), || t0).unwrap();
        assert_eq!((first.count, first.at, first.gap), (2, t0, None));
        // Half an event completes nothing, and does not ask the time.
        let half = Bytes::from(chunk(2));
        let (a, b) = half.split_at(10);
        assert_eq!(s.feed(&Bytes::copy_from_slice(a), || unreachable!()), None);
        let t1 = t0 + Duration::from_millis(30);
        let next = s.feed(&Bytes::copy_from_slice(b), || t1).unwrap();
        assert_eq!(next.count, 1);
        assert_eq!(next.gap, Some(Duration::from_millis(30)));
        // Comments, other fields and blank lines are no events.
        assert_eq!(
            s.feed(
                &Bytes::from_static(b": ping\n\nevent: x\nid: 3\n\n\n\n"),
                || unreachable!()
            ),
            None
        );
        // `data` with no value is one.
        assert_eq!(
            s.feed(&Bytes::from_static(b"data\n\n"), || t1)
                .map(|d| d.count),
            Some(1)
        );
        assert_eq!(s.events(), 4);
    }

    #[test]
    fn a_stream_without_usage_reports_none() {
        let mut text: String = (0..5).map(chunk).collect();
        text.push_str("data: [DONE]\n\n");
        let mut s = scanner("text/event-stream");
        feed(&mut s, &[text.as_bytes()]);
        assert_eq!(s.finish(), None);
        // Nor does one whose chunks talk about usage in their text.
        let mut s = scanner("text/event-stream");
        feed(
            &mut s,
            &[
                br#"data: {"choices":[{"delta":{"content":"\"usage\": {\"prompt_tokens\": 3}"}}]}

"#,
            ],
        );
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn the_last_usage_wins_and_null_does_not_erase_it() {
        // The Responses API: usage null when created, counts when
        // completed, within an event larger than its data line.
        let stream = concat!(
            "event: response.created\n",
            "data: {\"type\":\"response.created\",\"response\":{\"id\":\"r\",\"usage\":null}}\n\n",
            "event: response.output_text.delta\n",
            "data: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n",
            "event: response.completed\n",
            "data: {\"type\":\"response.completed\",\"response\":{\"id\":\"r\",\"output\":[],\"usage\":{\"input_tokens\":11,\"input_tokens_details\":{\"cached_tokens\":0},\"output_tokens\":2,\"total_tokens\":13},\"user\":null}}\n\n",
            "event: done\ndata: {\"usage\":null}\n\n",
        );
        let mut s = scanner("text/event-stream");
        feed(&mut s, &[stream.as_bytes()]);
        assert_eq!(
            s.finish(),
            Some(Usage {
                input: Some(11),
                output: Some(2)
            })
        );
        // Anthropic: input first, output last.
        let stream = concat!(
            "event: message_start\n",
            "data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n",
            "event: message_delta\n",
            "data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n\n",
        );
        let mut s = scanner("text/event-stream");
        feed(&mut s, &[stream.as_bytes()]);
        assert_eq!(
            s.finish(),
            Some(Usage {
                input: Some(25),
                output: Some(15)
            })
        );
    }

    #[test]
    fn the_last_usage_key_is_found_wherever_it_is() {
        let naive = |bytes: &[u8]| bytes.windows(KEY.len()).rposition(|w| w == KEY);
        // Keys among many `u`s (more than the quick tries), at the very
        // start and end, overlapping text, or none at all.
        let pieces: [&[u8]; 7] = [
            br#""usage""#,
            b"uuuuuu",
            br#""output_tokens":1"#,
            b"\"usag",
            b"e\"",
            b"x",
            br#"{"input_tokens":2}"#,
        ];
        let mut cases = 0;
        for a in 0..pieces.len() {
            for b in 0..pieces.len() {
                for c in 0..pieces.len() {
                    for d in 0..pieces.len() {
                        let text = [pieces[a], pieces[b], pieces[c], pieces[d]].concat();
                        assert_eq!(
                            rfind_key(&text),
                            naive(&text),
                            "{}",
                            String::from_utf8_lossy(&text)
                        );
                        cases += 1;
                    }
                }
            }
        }
        assert_eq!(cases, 7 * 7 * 7 * 7);
    }

    #[test]
    fn a_whole_json_answer_has_its_usage_read() {
        let answer = br#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":1,"total_tokens":10}}"#;
        for split in 0..=answer.len() {
            let mut s = scanner("application/json");
            assert_eq!(feed(&mut s, &[&answer[..split], &answer[split..]]), [0, 0]);
            assert_eq!(
                s.finish(),
                Some(Usage {
                    input: Some(9),
                    output: Some(1)
                }),
                "split at {split}"
            );
        }
        // A usage that is not first-level, or with key order and spaces of
        // its own; a JSON schema with a property named usage is not one.
        let answer = br#"{"object":"response","output":[],"usage" : { "output_tokens" : 4, "input_tokens": 3 },"tools":[{"parameters":{"properties":{"usage":{"type":"string"}}}}]}"#;
        let mut s = scanner("application/json; charset=utf-8");
        feed(&mut s, &[answer]);
        assert_eq!(
            s.finish(),
            Some(Usage {
                input: Some(3),
                output: Some(4)
            })
        );
        // Embeddings report input tokens only.
        let mut s = scanner("application/json");
        feed(
            &mut s,
            &[br#"{"data":[],"usage":{"prompt_tokens":8,"total_tokens":8}}"#],
        );
        assert_eq!(
            s.finish(),
            Some(Usage {
                input: Some(8),
                output: None
            })
        );
        let mut s = scanner("application/json");
        feed(&mut s, &[br#"{"choices":[]}"#]);
        assert_eq!(s.finish(), None);
        // The details objects beside the counts are skipped, a key may be
        // written with escapes, and a count may be null.
        let mut s = scanner("application/json");
        feed(
            &mut s,
            &[br#"{"usage":{"prompt_tokens_details":{"cached_tokens":2,"prompt_tokens":99},"prompt\u005ftokens":5,"completion_tokens":null,"completion_tokens_details":{"reasoning_tokens":3},"total_tokens":12}}"#],
        );
        assert_eq!(
            s.finish(),
            Some(Usage {
                input: Some(5),
                output: None
            })
        );
        // Counts that are not counts are no usage.
        let mut s = scanner("application/json");
        feed(
            &mut s,
            &[br#"{"usage":{"prompt_tokens":"5","completion_tokens":1}}"#],
        );
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn a_huge_json_answer_has_its_usage_found_in_its_tail_with_bounded_memory() {
        let content = "word ".repeat(200_000);
        let answer = format!(
            r#"{{"id":"x","choices":[{{"message":{{"content":"{content}"}}}}],"usage":{{"prompt_tokens":12,"completion_tokens":200000,"total_tokens":200012}},"system_fingerprint":"fp"}}"#
        );
        for frame in [1000, 4096, 16 * 1024, 65536, answer.len()] {
            let mut s = scanner("application/json");
            for part in answer.as_bytes().chunks(frame) {
                s.feed(&Bytes::copy_from_slice(part), Instant::now);
                assert!(s.tail.len() <= 2 * WINDOW, "frames of {frame}");
                assert!(s.tail.capacity() <= 2 * WINDOW, "frames of {frame}");
            }
            assert_eq!(
                s.finish(),
                Some(Usage {
                    input: Some(12),
                    output: Some(200_000)
                }),
                "frames of {frame}"
            );
        }
        // Frames of mixed sizes, and a usage near the start of the window
        // (a long field after it): the bytes it needs from earlier frames
        // are kept.
        let after = "y".repeat(WINDOW - 200);
        let answer = format!(
            r#"{{"choices":[{{"text":"{content}"}}],"usage":{{"prompt_tokens":3,"completion_tokens":4}},"after":"{after}"}}"#
        );
        for sizes in [
            &[1, 7000, 16384, 20000, 3][..],
            &[100],
            &[9000, 1],
            &[16383, 2],
        ] {
            let mut s = scanner("application/json");
            let mut rest = answer.as_bytes();
            for size in sizes.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (part, more) = rest.split_at((*size).min(rest.len()));
                s.feed(&Bytes::copy_from_slice(part), Instant::now);
                assert!(s.tail.capacity() <= 2 * WINDOW, "frames of {sizes:?}");
                rest = more;
            }
            assert_eq!(
                s.finish(),
                Some(Usage {
                    input: Some(3),
                    output: Some(4)
                }),
                "frames of {sizes:?}"
            );
        }
        // A usage that is not in the tail is not found.
        let answer = format!(r#"{{"usage":{{"prompt_tokens":1}},"content":"{content}"}}"#);
        let mut s = scanner("application/json");
        for part in answer.as_bytes().chunks(8192) {
            s.feed(&Bytes::copy_from_slice(part), Instant::now);
        }
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn a_huge_event_keeps_only_the_window() {
        let content = "x".repeat(1 << 20);
        let event = format!(
            "event: response.completed\ndata: {{\"response\":{{\"output\":[{{\"text\":\"{content}\"}}],\"usage\":{{\"input_tokens\":5,\"output_tokens\":6}}}}}}\n\n"
        );
        let mut s = scanner("text/event-stream");
        let mut count = 0;
        for part in event.as_bytes().chunks(1000) {
            count += s
                .feed(&Bytes::copy_from_slice(part), Instant::now)
                .map_or(0, |d| d.count);
            assert!(s.tail.len() <= 2 * WINDOW);
            assert!(s.tail.capacity() <= 2 * WINDOW);
        }
        assert_eq!(count, 1);
        assert_eq!(s.tail.capacity(), 0, "released when the event ended");
        assert_eq!(
            s.finish(),
            Some(Usage {
                input: Some(5),
                output: Some(6)
            })
        );
        // An event that never ends is held to the window too.
        let mut s = scanner("text/event-stream");
        for _ in 0..1000 {
            s.feed(&Bytes::from_static(&[b'x'; 1000]), Instant::now);
        }
        assert!(s.tail.capacity() <= 2 * WINDOW);
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn an_unterminated_last_event_still_gives_its_usage() {
        let mut s = scanner("text/event-stream");
        let counts = feed(
            &mut s,
            &[chunk(0).as_bytes(), USAGE_CHUNK.trim_end().as_bytes()],
        );
        assert_eq!(counts, [1, 0]);
        assert_eq!(s.finish().and_then(|u| u.input), Some(17));
    }

    #[test]
    fn answers_without_token_counts_are_not_scanned() {
        let headers = |pairs: &[(&str, &str)]| {
            let mut map = HeaderMap::new();
            for (k, v) in pairs {
                map.insert(
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            map
        };
        let json = headers(&[("content-type", "application/json")]);
        let ok = StatusCode::OK;
        assert!(Scanner::for_response(ok, &json, "/v1/completions").is_some());
        assert!(
            Scanner::for_response(ok, &json, "/v2/models/resnet/infer").is_none(),
            "KServe v2"
        );
        assert!(
            Scanner::for_response(StatusCode::TOO_MANY_REQUESTS, &json, "/v1/x").is_none(),
            "an error"
        );
        for other in [
            headers(&[("content-type", "application/grpc")]),
            headers(&[("content-type", "text/plain")]),
            headers(&[]),
            headers(&[
                ("content-type", "application/json"),
                ("content-encoding", "gzip"),
            ]),
        ] {
            assert!(
                Scanner::for_response(ok, &other, "/v1/x").is_none(),
                "{other:?}"
            );
        }
        let problem = headers(&[("content-type", "application/problem+json")]);
        assert!(Scanner::for_response(ok, &problem, "/v1/x").is_some());
    }
}
