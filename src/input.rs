//! Events as writers give them (`append`'s JSON, `inject`'s generator): validation
//! against the contract, and their JSON form.
//!
//! This is the writers' half of the contract (docs/DESIGN.md §2): an event that passes it is
//! one PostgreSQL stores and the projector can project. It is pure (bytes in, events or a
//! list of problems out), so every rule is unit-tested, and the tests re-check what
//! `inject` wrote with it. `writer` puts validated events into the database.

use std::collections::HashMap;
use std::net::IpAddr;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::error::Result;
use crate::event::{EventType, Field, ENTITY_TYPES};
use crate::suggest;

/// The longest single event (one JSON line, or one pretty-printed document) we accept.
pub const MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;

/// The largest input one `append` reads: it is validated whole, in memory, before
/// anything is written, and written in one transaction.
pub const MAX_INPUT_BYTES: usize = 256 * 1024 * 1024;

/// How many bad lines an error lists before it only counts the rest.
pub const MAX_REPORTED_LINES: usize = 20;

/// The top-level keys of an event: exactly the columns of `chronicle_events`.
pub const EVENT_KEYS: &[&str] = &[
    "id",
    "library_id",
    "actor_user_id",
    "entity_type",
    "entity_id",
    "event_type",
    "before",
    "after",
    "diff",
    "occurred_at",
    "created_at",
    "request_id",
    "client",
    "reason",
    "ip",
];

/// What the validation lets through beyond the catalog.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rules {
    /// Accept an `event_type` the catalog does not know (the projector will fail it as
    /// `unknown_event_type` until a version that knows it is deployed).
    pub allow_unknown_type: bool,
}

/// One valid event, ready to insert. `id` and `created_at` are optional: the writer
/// generates a UUIDv7 for a missing id, and the database's now() for a missing
/// created_at.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub id: Option<Uuid>,
    pub library_id: Uuid,
    pub actor_user_id: Option<Uuid>,
    pub entity_type: String,
    pub entity_id: Uuid,
    pub event_type: String,
    pub before: Option<Value>,
    pub after: Option<Value>,
    pub diff: Option<Value>,
    pub occurred_at: DateTime<Utc>,
    pub created_at: Option<DateTime<Utc>>,
    pub request_id: Option<String>,
    pub client: Option<String>,
    pub reason: Option<String>,
    pub ip: Option<IpAddr>,
}

/// An event read from the input, with the line it started on.
#[derive(Debug, Clone, PartialEq)]
pub struct InputEvent {
    pub line: usize,
    pub event: NewEvent,
}

/// Why an input was refused: the bad lines (the first `MAX_REPORTED_LINES`) and how
/// many there were in all, or one problem with the input as a whole.
#[derive(Debug, Clone, PartialEq)]
pub struct InputError {
    /// `(line, problems of that line)`.
    pub lines: Vec<(usize, Vec<String>)>,
    pub bad_lines: usize,
    pub events: usize,
    /// A problem of the whole input (empty, too large), when there is one.
    pub whole: Option<String>,
}

impl InputError {
    fn whole(msg: impl Into<String>) -> InputError {
        InputError { lines: Vec::new(), bad_lines: 0, events: 0, whole: Some(msg.into()) }
    }
}

impl std::fmt::Display for InputError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(w) = &self.whole {
            return write!(f, "{w}; nothing was written");
        }
        let s = if self.bad_lines == 1 { "" } else { "s" };
        write!(f, "{} bad line{s} in the input ({} events read); nothing was written:", self.bad_lines, self.events)?;
        for (line, problems) in &self.lines {
            write!(f, "\n  line {line}: {}", problems.join("; "))?;
        }
        if self.bad_lines > self.lines.len() {
            write!(f, "\n  ... and {} more bad lines", self.bad_lines - self.lines.len())?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------
// Reading the input

/// Parses and validates a whole input: one JSON event (which may span lines), or JSON
/// lines, one event per line, blank lines ignored. Every line is checked, so the error
/// lists all bad lines (up to a limit), not just the first.
pub fn parse_events(input: &[u8], rules: Rules) -> Result<Vec<InputEvent>, InputError> {
    if input.len() > MAX_INPUT_BYTES {
        return Err(InputError::whole(format!(
            "the input is larger than {} MiB: split it into several appends (each is atomic on its own)",
            MAX_INPUT_BYTES >> 20
        )));
    }
    // Windows tools (PowerShell's Out-File, Notepad) may start a file with a BOM.
    let input = input.strip_prefix(b"\xEF\xBB\xBF".as_slice()).unwrap_or(input);
    let lines: Vec<&[u8]> = input.split(|&b| b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l)).collect();
    let first = match lines.iter().position(|l| !is_blank(l)) {
        Some(i) => i,
        None => return Err(InputError::whole("the input holds no events")),
    };
    let more_than_one_line = lines[first + 1..].iter().any(|l| !is_blank(l));

    // One event pretty-printed over several lines.
    if more_than_one_line && input.len() <= MAX_EVENT_BYTES {
        if let Ok(v) = serde_json::from_slice::<Value>(input) {
            let line = first + 1;
            return match event_from_json(&v, rules) {
                Ok(event) => Ok(vec![InputEvent { line, event }]),
                Err(problems) => {
                    Err(InputError { lines: vec![(line, problems)], bad_lines: 1, events: 1, whole: None })
                }
            };
        }
    }

    let mut events = Vec::new();
    let mut err = InputError { lines: Vec::new(), bad_lines: 0, events: 0, whole: None };
    for (i, raw) in lines.iter().enumerate() {
        if is_blank(raw) {
            continue;
        }
        let line = i + 1;
        err.events += 1;
        match parse_line(raw, rules) {
            Ok(event) => events.push(InputEvent { line, event }),
            Err(mut problems) => {
                if i == first && more_than_one_line && problems.iter().any(|p| p.contains("EOF while parsing")) {
                    problems.push(
                        "(an event spread over several lines is accepted only when it is the whole input; \
                         JSON lines take one event per line)"
                            .into(),
                    );
                }
                err.bad_lines += 1;
                if err.lines.len() < MAX_REPORTED_LINES {
                    err.lines.push((line, problems));
                }
            }
        }
    }
    if err.bad_lines > 0 {
        return Err(err);
    }
    Ok(events)
}

/// The events whose id repeats the id of an earlier one: `(line, earlier line, id)`.
pub fn repeated_ids(events: &[InputEvent]) -> Vec<(usize, usize, Uuid)> {
    let mut first_line: HashMap<Uuid, usize> = HashMap::new();
    let mut repeated = Vec::new();
    for e in events {
        if let Some(id) = e.event.id {
            match first_line.get(&id) {
                Some(&earlier) => repeated.push((e.line, earlier, id)),
                None => {
                    first_line.insert(id, e.line);
                }
            }
        }
    }
    repeated
}

fn is_blank(line: &[u8]) -> bool {
    line.iter().all(u8::is_ascii_whitespace)
}

fn parse_line(raw: &[u8], rules: Rules) -> Result<NewEvent, Vec<String>> {
    if raw.len() > MAX_EVENT_BYTES {
        return Err(vec![format!(
            "the line is {} bytes long; an event must fit in {} MiB",
            raw.len(),
            MAX_EVENT_BYTES >> 20
        )]);
    }
    let text = std::str::from_utf8(raw).map_err(|e| {
        vec![format!("not valid UTF-8 (byte 0x{:02x} at column {})", raw[e.valid_up_to()], e.valid_up_to() + 1)]
    })?;
    let v: Value = serde_json::from_str(text).map_err(|e| vec![format!("malformed JSON: {e}")])?;
    event_from_json(&v, rules)
}

// ---------------------------------------------------------------------------------
// Validating one event

/// Validates one event given as JSON and returns it typed, or every problem found,
/// each naming the key it is about.
pub fn event_from_json(v: &Value, rules: Rules) -> Result<NewEvent, Vec<String>> {
    let obj = match v {
        Value::Object(o) => o,
        other => return Err(vec![format!("an event must be a JSON object, got {}", json_kind(other))]),
    };
    let mut p = Problems::default();

    let mut nul_paths = Vec::new();
    for (k, v) in obj {
        find_nul(v, k, &mut nul_paths);
    }
    for path in nul_paths {
        p.push(format!("{path} contains a NUL character (\\u0000), which PostgreSQL cannot store"));
    }
    for k in obj.keys().filter(|k| !EVENT_KEYS.contains(&k.as_str())) {
        match suggest::closest(k, EVENT_KEYS) {
            Some(near) => p.push(format!("unknown key {k:?} (did you mean {near:?}?)")),
            None => p.push(format!("unknown key {k:?} (an event has only: {})", EVENT_KEYS.join(", "))),
        }
    }

    let id = p.opt(obj, "id", uuid_of);
    let library_id = p.req(obj, "library_id", uuid_of);
    let actor_user_id = p.opt(obj, "actor_user_id", uuid_of);
    let entity_type = p.req(obj, "entity_type", |v| {
        let s = string_of(v)?;
        if ENTITY_TYPES.contains(&s.as_str()) {
            Ok(s)
        } else {
            Err(format!("{s:?} is not an entity type (one of: {})", ENTITY_TYPES.join(", ")))
        }
    });
    let entity_id = p.req(obj, "entity_id", uuid_of);
    let event_type = p.req(obj, "event_type", string_of);
    let before = p.opt(obj, "before", object_of);
    let after = p.opt(obj, "after", object_of);
    let diff = p.opt(obj, "diff", object_of);
    let occurred_at = p.req(obj, "occurred_at", time_of);
    let created_at = p.opt(obj, "created_at", time_of);
    let request_id = p.opt(obj, "request_id", string_of);
    let client = p.opt(obj, "client", string_of);
    let reason = p.opt(obj, "reason", string_of);
    let ip = p.opt(obj, "ip", |v| {
        let s = string_of(v)?;
        s.parse::<IpAddr>().map_err(|_| format!("{s:?} is not an IP address (such as 203.0.113.7 or 2001:db8::1)"))
    });

    if let Some(event_type) = &event_type {
        // A before or after that is not an object was reported above; the catalog check
        // would only repeat it.
        let shapes_ok = before.is_some() && after.is_some();
        match EventType::parse(event_type) {
            Some(_) if !shapes_ok => {}
            Some(_) => {
                let entity = entity_type.as_deref().unwrap_or("");
                let (b, a) = (before.as_ref().and_then(Option::as_ref), after.as_ref().and_then(Option::as_ref));
                for problem in check_catalog(event_type, entity, b, a) {
                    p.push(problem);
                }
            }
            None if rules.allow_unknown_type => {
                if event_type.trim().is_empty() || event_type.trim() != event_type {
                    p.push(format!("event_type {event_type:?} must be a non-empty name without surrounding spaces"));
                }
            }
            None => {
                let close = |t: &EventType| t.as_str().eq_ignore_ascii_case(event_type.trim());
                let hint = match EventType::ALL.into_iter().find(close) {
                    Some(t) => format!(" (did you mean {:?}?)", t.as_str()),
                    None => String::new(),
                };
                p.push(format!(
                    "event_type {event_type:?} is not in the event catalog{hint}; the projector would fail it as \
                     unknown_event_type (pass --allow-unknown-type to append it anyway)"
                ));
            }
        }
    }

    if !p.0.is_empty() {
        return Err(p.0);
    }
    // Every required value is present when there is no problem.
    match (library_id, entity_type, entity_id, event_type, occurred_at) {
        (Some(library_id), Some(entity_type), Some(entity_id), Some(event_type), Some(occurred_at)) => Ok(NewEvent {
            id: id.flatten(),
            library_id,
            actor_user_id: actor_user_id.flatten(),
            entity_type,
            entity_id,
            event_type,
            before: before.flatten(),
            after: after.flatten(),
            diff: diff.flatten(),
            occurred_at,
            created_at: created_at.flatten(),
            request_id: request_id.flatten(),
            client: client.flatten(),
            reason: reason.flatten(),
            ip: ip.flatten(),
        }),
        _ => Err(vec!["a required key is missing".into()]),
    }
}

/// Checks a catalog event's entity type and required payload fields, as the catalog of
/// docs/DESIGN.md §2 says; one message per problem. Empty for an unknown type.
pub fn check_catalog(
    event_type: &str,
    entity_type: &str,
    before: Option<&Value>,
    after: Option<&Value>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let Some(ty) = EventType::parse(event_type) else {
        return problems;
    };
    let spec = ty.spec();
    if !entity_type.is_empty() && !spec.entity_types.contains(&entity_type) {
        problems.push(format!(
            "entity_type {entity_type:?} does not fit {ty} (it concerns a {})",
            spec.entity_types.join(" or a ")
        ));
    }
    for (side, fields, payload) in [("before", spec.before, before), ("after", spec.after, after)] {
        check_side(ty.as_str(), side, fields, payload, &mut problems);
    }
    problems
}

fn check_side(type_name: &str, side: &str, fields: &[Field], payload: Option<&Value>, out: &mut Vec<String>) {
    if fields.is_empty() {
        return;
    }
    let names: Vec<&str> = fields.iter().map(|f| f.name).collect();
    let object = match payload {
        Some(Value::Object(o)) => o,
        _ => {
            out.push(format!("{side} is missing ({type_name} requires {side} with {})", names.join(", ")));
            return;
        }
    };
    for field in fields {
        match object.get(field.name) {
            None => out.push(format!("{side}.{} is missing ({type_name} requires {})", field.name, field.name)),
            Some(v) if !field.kind.accepts(v) => out.push(format!(
                "{side}.{} must be {}, got {} ({type_name} requires it)",
                field.name,
                field.kind.describe(),
                describe_value(v)
            )),
            Some(_) => {}
        }
    }
}

/// Collects the problems of one event while its keys are read.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn push(&mut self, problem: String) {
        self.0.push(problem);
    }

    /// A required key: absent or null is a problem. `None` when there was a problem.
    fn req<T>(&mut self, obj: &Map<String, Value>, key: &str, f: impl Fn(&Value) -> Result<T, String>) -> Option<T> {
        match obj.get(key) {
            None => {
                self.push(format!("{key} is missing (it is required)"));
                None
            }
            Some(Value::Null) => {
                self.push(format!("{key} is null (it is required)"));
                None
            }
            Some(v) => self.check(key, f(v)),
        }
    }

    /// An optional key: `Some(None)` when absent or null, `None` when it was bad.
    fn opt<T>(
        &mut self,
        obj: &Map<String, Value>,
        key: &str,
        f: impl Fn(&Value) -> Result<T, String>,
    ) -> Option<Option<T>> {
        match obj.get(key) {
            None | Some(Value::Null) => Some(None),
            Some(v) => self.check(key, f(v)).map(Some),
        }
    }

    fn check<T>(&mut self, key: &str, r: Result<T, String>) -> Option<T> {
        match r {
            Ok(t) => Some(t),
            Err(why) => {
                self.push(format!("{key}: {why}"));
                None
            }
        }
    }
}

fn string_of(v: &Value) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        other => Err(format!("must be a string, got {}", json_kind(other))),
    }
}

fn uuid_of(v: &Value) -> Result<Uuid, String> {
    let s = match v {
        Value::String(s) => s,
        other => return Err(format!("must be a UUID string, got {}", json_kind(other))),
    };
    Uuid::parse_str(s).map_err(|_| format!("{s:?} is not a UUID (such as 0190a5c4-9a0e-7cc1-8a42-2f7e3f6c2d11)"))
}

fn time_of(v: &Value) -> Result<DateTime<Utc>, String> {
    let s = match v {
        Value::String(s) => s,
        other => return Err(format!("must be an RFC 3339 time string, got {}", json_kind(other))),
    };
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("{s:?} is not an RFC 3339 time such as 2025-03-01T09:30:00Z ({e})"))
}

fn object_of(v: &Value) -> Result<Value, String> {
    match v {
        Value::Object(_) => Ok(v.clone()),
        other => Err(format!("must be a JSON object or null, got {}", json_kind(other))),
    }
}

/// Records the path of every string (value or object key) holding a NUL, which
/// neither `text` nor `jsonb` can store.
fn find_nul(v: &Value, path: &str, out: &mut Vec<String>) {
    match v {
        Value::String(s) if s.contains('\0') => out.push(path.to_string()),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                find_nul(item, &format!("{path}[{i}]"), out);
            }
        }
        Value::Object(o) => {
            for (k, item) in o {
                let child = format!("{path}.{}", k.replace('\0', "\\u0000"));
                if k.contains('\0') {
                    out.push(format!("the key {child}"));
                }
                find_nul(item, &child, out);
            }
        }
        _ => {}
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A rejected payload value: its kind, or itself when the kind was right and the
/// content was not (a string that is no UUID, a number that is no integer).
fn describe_value(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{:?}", clip(s, 60)),
        Value::Number(n) => format!("{n}"),
        other => json_kind(other).to_string(),
    }
}

fn clip(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// The JSON form of an event, as `append` reads it (keys with no value left out).
pub fn event_to_json(id: Option<Uuid>, e: &NewEvent) -> Value {
    let mut m = Map::new();
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            m.insert(k.to_string(), v);
        }
    };
    let time = |t: DateTime<Utc>| Value::from(t.to_rfc3339_opts(SecondsFormat::Micros, true));
    put("id", id.or(e.id).map(|u| Value::from(u.to_string())));
    put("library_id", Some(Value::from(e.library_id.to_string())));
    put("actor_user_id", e.actor_user_id.map(|u| Value::from(u.to_string())));
    put("entity_type", Some(Value::from(e.entity_type.clone())));
    put("entity_id", Some(Value::from(e.entity_id.to_string())));
    put("event_type", Some(Value::from(e.event_type.clone())));
    put("before", e.before.clone());
    put("after", e.after.clone());
    put("diff", e.diff.clone());
    put("occurred_at", Some(time(e.occurred_at)));
    put("created_at", e.created_at.map(time));
    put("request_id", e.request_id.clone().map(Value::from));
    put("client", e.client.clone().map(Value::from));
    put("reason", e.reason.clone().map(Value::from));
    put("ip", e.ip.map(|ip| Value::from(ip.to_string())));
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LIB: &str = "0190a5c4-9a0e-7cc1-8a42-2f7e3f6c2d11";
    const BOOK: &str = "0190a5c4-9a0e-7cc1-8a42-2f7e3f6c2d12";
    const SHELF: &str = "0190a5c4-9a0e-7cc1-8a42-2f7e3f6c2d13";

    fn good() -> Value {
        json!({
            "library_id": LIB, "entity_type": "book", "entity_id": BOOK, "event_type": "BookCreated",
            "after": {"title": "Ops", "bookshelf_id": SHELF}, "occurred_at": "2025-03-01T09:30:00Z",
        })
    }

    fn with(key: &str, v: Value) -> Value {
        let mut e = good();
        e[key] = v;
        e
    }

    fn without(key: &str) -> Value {
        let mut e = good();
        e.as_object_mut().map(|o| o.remove(key));
        e
    }

    fn problems(v: &Value) -> String {
        match event_from_json(v, Rules::default()) {
            Ok(e) => panic!("accepted {v}: {e:?}"),
            Err(p) => p.join("; "),
        }
    }

    #[test]
    fn a_good_event_is_accepted_with_its_optional_values() {
        let e = event_from_json(&good(), Rules::default()).unwrap();
        assert_eq!(e.id, None);
        assert_eq!(e.event_type, "BookCreated");
        let full = with("ip", json!("2001:db8::1"));
        let full = {
            let mut f = full;
            f["id"] = json!(BOOK);
            f["actor_user_id"] = Value::Null;
            f["created_at"] = json!("2025-03-01T10:30:00.123456+08:00");
            f["request_id"] = json!("req-1");
            f["diff"] = json!({"title": ["", "Ops"]});
            f
        };
        let e = event_from_json(&full, Rules::default()).unwrap();
        assert_eq!(e.id, Some(Uuid::parse_str(BOOK).unwrap()));
        assert_eq!(e.actor_user_id, None);
        assert_eq!(e.created_at.map(|t| t.to_rfc3339()), Some("2025-03-01T02:30:00.123456+00:00".into()));
        assert!(e.ip.is_some());
    }

    #[test]
    fn each_rule_names_what_is_wrong() {
        let cases: Vec<(Value, &str)> = vec![
            (without("library_id"), "library_id is missing"),
            (with("occurred_at", Value::Null), "occurred_at is null"),
            (with("entity_id", json!("abc")), "entity_id: \"abc\" is not a UUID"),
            (with("id", json!(7)), "id: must be a UUID string, got a number"),
            (with("id", json!("0190a5c4-9a0e-7cc1-8a42")), "is not a UUID"),
            (with("occurred_at", json!("2025-03-01 09:30")), "is not an RFC 3339 time"),
            (with("created_at", json!("yesterday")), "created_at: \"yesterday\""),
            (with("entity_type", json!("page")), "\"page\" is not an entity type"),
            (with("entity_type", json!("tag")), "entity_type \"tag\" does not fit BookCreated"),
            (with("event_type", json!("BookArchived")), "not in the event catalog"),
            (with("event_type", json!("bookcreated")), "did you mean \"BookCreated\"?"),
            (
                with("after", json!({"title": "Ops"})),
                "after.bookshelf_id is missing (BookCreated requires bookshelf_id)",
            ),
            (with("after", json!({"title": 3, "bookshelf_id": SHELF})), "after.title must be a string, got 3"),
            (with("after", json!({"title": "x", "bookshelf_id": "shelf"})), "after.bookshelf_id must be a UUID string"),
            (with("after", Value::Null), "after is missing (BookCreated requires after with title, bookshelf_id)"),
            (with("after", json!([1])), "after: must be a JSON object or null, got an array"),
            (with("diff", json!("x")), "diff: must be a JSON object or null"),
            (with("reason", json!(1)), "reason: must be a string"),
            (with("ip", json!("10.0.0.300")), "is not an IP address"),
            (with("request_id", json!("a\u{0}b")), "request_id contains a NUL character"),
            (
                with("after", json!({"title": "Ops", "bookshelf_id": SHELF, "n": ["ok", "x\u{0}"]})),
                "after.n[1] contains a NUL",
            ),
            (
                with("ocurred_at", json!("2025-03-01T09:30:00Z")),
                "unknown key \"ocurred_at\" (did you mean \"occurred_at\"?)",
            ),
            (with("colour", json!(1)), "unknown key \"colour\" (an event has only"),
            (json!([good()]), "an event must be a JSON object, got an array"),
        ];
        for (v, expected) in cases {
            let p = problems(&v);
            assert!(p.contains(expected), "{v}\n  gave: {p}\n  expected: {expected}");
        }
    }

    #[test]
    fn unknown_types_pass_only_when_allowed() {
        let v = with("event_type", json!("BookArchived"));
        assert!(event_from_json(&v, Rules { allow_unknown_type: true }).is_ok());
        let v = with("event_type", json!(" "));
        assert!(event_from_json(&v, Rules { allow_unknown_type: true }).is_err());
    }

    #[test]
    fn tag_events_take_a_book_or_a_block() {
        let after = json!({"tag_id": SHELF, "tag_name": "rust"});
        for (entity, ok) in [("book", true), ("block", true), ("tag", false)] {
            let v = json!({"library_id": LIB, "entity_type": entity, "entity_id": BOOK, "event_type": "TagAdded",
                           "after": after, "occurred_at": "2025-03-01T09:30:00Z"});
            assert_eq!(event_from_json(&v, Rules::default()).is_ok(), ok, "{entity}");
        }
    }

    fn lines(events: &[Value]) -> Vec<u8> {
        events.iter().map(|e| format!("{e}\n")).collect::<String>().into_bytes()
    }

    #[test]
    fn json_lines_skip_blank_lines_and_keep_line_numbers() {
        let mut input = lines(&[good(), good()]);
        input.extend_from_slice(b"\r\n   \n");
        input.extend_from_slice(&lines(&[good()]));
        let events = parse_events(&input, Rules::default()).unwrap();
        assert_eq!(events.iter().map(|e| e.line).collect::<Vec<_>>(), vec![1, 2, 5]);
    }

    #[test]
    fn a_pretty_printed_event_and_a_bom_are_accepted() {
        let mut input = b"\xEF\xBB\xBF\n".to_vec();
        input.extend_from_slice(serde_json::to_string_pretty(&good()).unwrap().as_bytes());
        let events = parse_events(&input, Rules::default()).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].line, 2);
    }

    #[test]
    fn every_bad_line_is_reported_with_its_number() {
        let mut input = lines(&[good(), without("entity_id"), good()]);
        input.extend_from_slice(b"{\"library_id\": \n");
        input.extend_from_slice(b"\xff\xfe\n");
        input.extend_from_slice(&lines(&[with("after", json!({"title": "x"}))]));
        let err = parse_events(&input, Rules::default()).unwrap_err();
        assert_eq!(err.bad_lines, 4);
        assert_eq!(err.events, 6);
        let text = err.to_string();
        for expected in [
            "line 2: entity_id is missing",
            "line 4: malformed JSON",
            "line 5: not valid UTF-8 (byte 0xff at column 1)",
            "line 6: after.bookshelf_id is missing",
            "nothing was written",
        ] {
            assert!(text.contains(expected), "{text}\n  expected: {expected}");
        }
    }

    #[test]
    fn the_report_is_capped() {
        let bad: Vec<Value> = (0..50).map(|_| without("library_id")).collect();
        let err = parse_events(&lines(&bad), Rules::default()).unwrap_err();
        assert_eq!(err.bad_lines, 50);
        assert_eq!(err.lines.len(), MAX_REPORTED_LINES);
        assert!(err.to_string().contains("... and 30 more bad lines"), "{err}");
    }

    #[test]
    fn duplicate_ids_in_the_input_are_found() {
        let e = with("id", json!(BOOK));
        let events = parse_events(&lines(&[e.clone(), good(), e]), Rules::default()).unwrap();
        assert_eq!(repeated_ids(&events), vec![(3, 1, Uuid::parse_str(BOOK).unwrap())]);
    }

    #[test]
    fn empty_and_oversized_inputs_are_refused() {
        assert!(parse_events(b"\n \n", Rules::default()).unwrap_err().to_string().contains("no events"));
        let long = vec![b' '; MAX_EVENT_BYTES + 1];
        let mut input = long.clone();
        input.insert(0, b'x');
        let err = parse_events(&input, Rules::default()).unwrap_err();
        assert!(err.to_string().contains("line 1: the line is"), "{err}");
    }

    #[test]
    fn json_round_trip_keeps_the_event() {
        let e = event_from_json(&with("ip", json!("203.0.113.9")), Rules::default()).unwrap();
        let again = event_from_json(&event_to_json(None, &e), Rules::default()).unwrap();
        assert_eq!(e, again);
    }
}
