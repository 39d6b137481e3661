//! The projection: one event of `chronicle_events` in, one row of `chronicle_entries` out.
//!
//! It is pure (no database, no clock) so that a worker, a replay and a rebuild all
//! build the same entry from the same event, and so every rule can be unit-tested. An
//! event this version cannot project is refused with a `ProjectError` whose class is an
//! `error_reason` of docs/DESIGN.md §3: such an event fails deterministically and waits for a
//! fix and a replay, it is never retried.

use std::collections::BTreeSet;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::error_reason::ErrorReason;
use crate::event::{Event, EventSpec, EventType, Field, FieldKind};
use crate::search;

/// The version of the projection rules, stored in each entry. Bump it when an entry
/// built from the same event would differ, so a rebuild can find the stale entries.
///
/// - 1: the first rules.
/// - 2: the search column holds the projector's tokens as they are (`array_to_tsvector`,
///   no positions) instead of Postgres' parse of them; same lexemes for ordinary text.
/// - 3: text values longer than `MAX_DETAIL_TEXT_BYTES` are cut in `details` (with a
///   marker and their full length); the event keeps the whole value.
pub const PROJECTION_VERSION: i32 = 3;

/// The longest text value kept whole in an entry's `details`, in bytes.
pub const MAX_DETAIL_TEXT_BYTES: usize = 4096;

/// The most characters of a value quoted in a summary.
const MAX_QUOTED_CHARS: usize = 120;

/// The payload fields whose text says what an entry is about, indexed for search.
const DISPLAY_FIELDS: &[&str] = &["name", "title", "tag_name", "book_title", "bookshelf_name"];

/// One row of `chronicle_entries`, before the database adds `projected_at`.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub id: Uuid,
    pub library_id: Uuid,
    pub actor_user_id: Option<Uuid>,
    pub entity_type: String,
    pub entity_id: Uuid,
    pub event_type: String,
    pub occurred_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub request_id: Option<String>,
    pub client: Option<String>,
    /// The event's `inet` as text, netmask included (`Event::ip`).
    pub ip: Option<String>,
    pub reason: Option<String>,
    pub summary: String,
    pub changed_fields: ChangedFields,
    /// `{"before": …, "after": …, "diff": …}` as compact JSON text, long texts cut: kept
    /// as text, not as a `Value`, so an entry in flight costs about its size in bytes.
    pub details: String,
    pub search_text: String,
    pub projection_version: i32,
}

/// Why an event cannot be projected. Both kinds are deterministic: retrying the same
/// event with the same version gives the same error.
#[derive(Debug, Clone, PartialEq)]
pub enum ProjectError {
    /// The event type is not one this version knows (the type name).
    UnknownEventType(String),
    /// The payload or entity type does not fit the catalog (the full message).
    InvalidPayload(String),
}

impl ProjectError {
    /// The `error_reason` recorded in the outbox and used as a metrics label.
    pub fn error_reason(&self) -> ErrorReason {
        match self {
            ProjectError::UnknownEventType(_) => ErrorReason::UnknownEventType,
            ProjectError::InvalidPayload(_) => ErrorReason::InvalidPayload,
        }
    }
}

impl fmt::Display for ProjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProjectError::UnknownEventType(t) => {
                write!(f, "unknown event type {}: not in the event catalog of this version", quote(t))
            }
            ProjectError::InvalidPayload(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for ProjectError {}

/// Builds the entry of `e`, or says why this version cannot.
pub fn project(e: &Event) -> Result<Entry, ProjectError> {
    let ty = EventType::parse(&e.event_type).ok_or_else(|| ProjectError::UnknownEventType(e.event_type.clone()))?;
    validate(ty.spec(), e).map_err(|problem| ProjectError::InvalidPayload(format!("{ty}: {problem}")))?;
    let summary = summarize(ty, &Payload::of(e));
    let search_text = search_text(e, &summary);
    Ok(Entry {
        id: e.id,
        library_id: e.library_id,
        actor_user_id: e.actor_user_id,
        entity_type: e.entity_type.clone(),
        entity_id: e.entity_id,
        event_type: e.event_type.clone(),
        occurred_at: e.occurred_at,
        created_at: e.created_at,
        request_id: e.request_id.clone(),
        client: e.client.clone(),
        ip: e.ip.clone(),
        reason: e.reason.clone(),
        summary,
        changed_fields: changed_fields(e),
        details: details(e)?,
        search_text,
        projection_version: PROJECTION_VERSION,
    })
}

// ---------------------------------------------------------------------------------
// Validation against the catalog

/// Checks the entity type and the required payload fields; the error names the field.
fn validate(ty: &EventSpec, e: &Event) -> Result<(), String> {
    if !ty.entity_types.contains(&e.entity_type.as_str()) {
        return Err(format!(
            "entity_type {} is not allowed, expected {}",
            quote(&e.entity_type),
            ty.entity_types.join(" or ")
        ));
    }
    validate_side("before", ty.before, e.before.as_ref())?;
    validate_side("after", ty.after, e.after.as_ref())
}

/// Checks that one side of the payload is an object carrying `fields`.
fn validate_side(side: &str, fields: &[Field], payload: Option<&Value>) -> Result<(), String> {
    if fields.is_empty() {
        return Ok(());
    }
    let object = match payload {
        None | Some(Value::Null) => return Err(format!("{side} is missing")),
        Some(Value::Object(object)) => object,
        Some(other) => return Err(format!("{side} must be an object, got {}", json_kind(other))),
    };
    for field in fields {
        match object.get(field.name) {
            None => return Err(format!("{side}.{} is missing", field.name)),
            Some(v) if !field.kind.accepts(v) => {
                return Err(format!(
                    "{side}.{} must be {}, got {}",
                    field.name,
                    field.kind.describe(),
                    describe_mismatch(field.kind, v)
                ))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// What a rejected value is: its JSON kind, or the value itself when its kind was right
/// but its content was not (a string that is no UUID, a number that is no integer).
fn describe_mismatch(kind: FieldKind, v: &Value) -> String {
    match (kind, v) {
        (FieldKind::Uuid, Value::String(s)) => format!("{}, which is not a UUID", quote(s)),
        (FieldKind::Integer, Value::Number(n)) => format!("{n}, which is not an integer"),
        _ => json_kind(v).to_string(),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

// ---------------------------------------------------------------------------------
// Summary

/// Read access to an event's payload for the summary. Validation has run, so required
/// fields are there; display fields may not be, and every lookup is optional.
struct Payload<'a> {
    entity_type: &'a str,
    before: Option<&'a Value>,
    after: Option<&'a Value>,
}

impl<'a> Payload<'a> {
    fn of(e: &'a Event) -> Payload<'a> {
        Payload { entity_type: &e.entity_type, before: e.before.as_ref(), after: e.after.as_ref() }
    }

    fn before(&self, key: &str) -> Option<&'a Value> {
        self.before?.get(key)
    }

    fn after(&self, key: &str) -> Option<&'a Value> {
        self.after?.get(key)
    }

    /// A text field of `after`, else of `before`: the current display name of a thing.
    fn text(&self, key: &str) -> Option<&'a str> {
        let from_after = self.after(key).and_then(Value::as_str);
        from_after.or_else(|| self.before(key).and_then(Value::as_str))
    }

    fn before_text(&self, key: &str) -> Option<&'a str> {
        self.before(key).and_then(Value::as_str)
    }

    fn after_text(&self, key: &str) -> Option<&'a str> {
        self.after(key).and_then(Value::as_str)
    }

    /// `"Old" → "New"` for a rename of field `key`.
    fn rename(&self, key: &str) -> String {
        let old = quote(self.before_text(key).unwrap_or_default());
        let new = quote(self.after_text(key).unwrap_or_default());
        format!("{old} → {new}")
    }

    /// ` "Name"` from field `key`, for `Created book "Ops"`; empty when absent.
    fn named(&self, key: &str) -> String {
        phrase(" ", self.text(key))
    }

    /// ` in "Book"` for block events carrying the optional `book_title`.
    fn in_book(&self) -> String {
        phrase(" in ", self.text("book_title"))
    }

    /// What a tag was added to or removed from: `book "Ops"`, `block in "Ops"`, or
    /// `a book` / `a block` when no title was given.
    fn tagged_thing(&self) -> String {
        let title = match self.entity_type {
            "book" => self.text("book_title").or_else(|| self.text("title")),
            _ => self.text("book_title"),
        };
        match (self.entity_type, title) {
            ("block", Some(t)) => format!("block in {}", quote(t)),
            (thing, Some(t)) => format!("{thing} {}", quote(t)),
            (thing, None) => format!("a {thing}"),
        }
    }
}

/// One readable English sentence for an event of type `ty`.
fn summarize(ty: EventType, p: &Payload) -> String {
    match ty {
        EventType::LibraryCreated => format!("Created library{}", p.named("name")),
        EventType::LibraryRenamed => format!("Renamed library {}", p.rename("name")),
        EventType::BookshelfCreated => format!("Created bookshelf{}", p.named("name")),
        EventType::BookshelfRenamed => format!("Renamed bookshelf {}", p.rename("name")),
        EventType::BookshelfDeleted => format!("Deleted bookshelf{}", p.named("name")),
        EventType::BookCreated => format!("Created book{}{}", p.named("title"), in_bookshelf(p)),
        EventType::BookRenamed => format!("Renamed book {}", p.rename("title")),
        EventType::BookMoved => book_moved(p),
        EventType::BookDeleted => format!("Deleted book{}", p.named("title")),
        EventType::BookRestored => format!("Restored book{}", p.named("title")),
        EventType::BlockCreated => format!("Created {}{}", block_of_kind(p), p.in_book()),
        EventType::BlockUpdated => format!("Edited block{}", p.in_book()),
        EventType::BlockMoved => block_moved(p),
        EventType::BlockDeleted => format!("Deleted block{}", p.in_book()),
        EventType::TagCreated => format!("Created tag{}", p.named("name")),
        EventType::TagRenamed => format!("Renamed tag {}", p.rename("name")),
        EventType::TagDeleted => format!("Deleted tag{}", p.named("name")),
        EventType::TagAdded => format!("Added tag{} to {}", p.named("tag_name"), p.tagged_thing()),
        EventType::TagRemoved => format!("Removed tag{} from {}", p.named("tag_name"), p.tagged_thing()),
    }
}

/// ` in bookshelf "Work"` when a created book carries its bookshelf's name.
fn in_bookshelf(p: &Payload) -> String {
    phrase(" in bookshelf ", p.after_text("bookshelf_name"))
}

/// `Moved book "Ops" from bookshelf "A" to bookshelf "B"`, with whatever names are known.
fn book_moved(p: &Payload) -> String {
    let from = phrase(" from bookshelf ", p.before_text("bookshelf_name"));
    let to = match p.after_text("bookshelf_name") {
        Some(n) => format!("bookshelf {}", quote(n)),
        None => "another bookshelf".to_string(),
    };
    format!("Moved book{}{from} to {to}", p.named("title"))
}

/// `paragraph block`, from the created block's `kind`, or `block` if it is blank.
fn block_of_kind(p: &Payload) -> String {
    let kind = one_line(p.after_text("kind").unwrap_or_default());
    if kind.is_empty() {
        "block".to_string()
    } else {
        format!("{} block", clip(&kind, 40))
    }
}

/// `Moved block from position 3 to 5`, plus the book when its title is known.
fn block_moved(p: &Payload) -> String {
    let position = |v: Option<&Value>| v.map(Value::to_string).unwrap_or_else(|| "?".to_string());
    let from = position(p.before("position"));
    let to = position(p.after("position"));
    format!("Moved block{} from position {from} to {to}", p.in_book())
}

/// `words` followed by the quoted value, or nothing when there is no value.
fn phrase(words: &str, value: Option<&str>) -> String {
    value.map(|v| format!("{words}{}", quote(v))).unwrap_or_default()
}

/// A value in double quotes, on one line and cut to `MAX_QUOTED_CHARS` with "…".
fn quote(value: &str) -> String {
    format!("\"{}\"", clip(&one_line(value), MAX_QUOTED_CHARS))
}

/// The text with each run of whitespace or control characters made one space.
fn one_line(text: &str) -> String {
    let is_gap = |c: char| c.is_whitespace() || c.is_control();
    text.split(is_gap).filter(|w| !w.is_empty()).collect::<Vec<_>>().join(" ")
}

/// At most `max` characters of `text`, with "…" when something was cut.
fn clip(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

// ---------------------------------------------------------------------------------
// Changed fields, details, search

/// The sorted payload keys whose value differs between `before` and `after` (a missing
/// key counts as null), plus the keys of `diff` when it is an object.
fn changed_fields(e: &Event) -> ChangedFields {
    let before = as_object(e.before.as_ref());
    let after = as_object(e.after.as_ref());
    let keys = before.iter().chain(after.iter()).flat_map(|o| o.keys());
    let mut changed: BTreeSet<&str> =
        keys.filter(|k| field(before, k) != field(after, k)).map(String::as_str).collect();
    if let Some(diff) = as_object(e.diff.as_ref()) {
        changed.extend(diff.keys().map(String::as_str));
    }
    changed.into_iter().collect()
}

/// An entry's changed field names, in order, held as one text and the end of each name
/// in it: a payload of 100,000 changed keys costs its bytes, not 100,000 allocations
/// waiting for their batch to be written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangedFields {
    text: String,
    ends: Vec<usize>,
}

impl ChangedFields {
    /// The names, in order.
    pub fn iter(&self) -> impl Iterator<Item = &str> + '_ {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts.zip(self.ends.iter().copied()).map(|(start, end)| &self.text[start..end])
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The bytes of all names.
    pub fn text_len(&self) -> usize {
        self.text.len()
    }

    pub fn to_vec(&self) -> Vec<String> {
        self.iter().map(str::to_string).collect()
    }
}

impl<'a> FromIterator<&'a str> for ChangedFields {
    fn from_iter<I: IntoIterator<Item = &'a str>>(names: I) -> Self {
        let mut fields = ChangedFields::default();
        for name in names {
            fields.text.push_str(name);
            fields.ends.push(fields.text.len());
        }
        fields.text.shrink_to_fit();
        fields.ends.shrink_to_fit();
        fields
    }
}

fn as_object(v: Option<&Value>) -> Option<&Map<String, Value>> {
    v.and_then(Value::as_object)
}

fn field<'a>(object: Option<&'a Map<String, Value>>, key: &str) -> &'a Value {
    object.and_then(|o| o.get(key)).unwrap_or(&Value::Null)
}

/// `{"before": …, "after": …, "diff": …}` with only the parts the event has, written
/// straight to JSON text (no copy of the payload as a `Value`). Writing a `Value` as
/// JSON does not fail; if it ever did, the event would fail alone, `invalid_payload`.
fn details(e: &Event) -> Result<String, ProjectError> {
    let parts = [("before", &e.before), ("after", &e.after), ("diff", &e.diff)];
    let present: Vec<(&str, CutLongTexts)> = parts
        .into_iter()
        .filter_map(|(key, v)| match v {
            None | Some(Value::Null) => None,
            Some(v) => Some((key, CutLongTexts(v))),
        })
        .collect();
    let mut text = serde_json::to_string(&DetailsParts(&present)).map_err(|err| {
        ProjectError::InvalidPayload(format!("{}: details cannot be written as JSON: {err}", e.event_type))
    })?;
    // The text grew by doubling; an entry waits for its batch, so keep only its length.
    text.shrink_to_fit();
    Ok(text)
}

/// The parts of `details`, as a JSON object in the order given.
struct DetailsParts<'a>(&'a [(&'a str, CutLongTexts<'a>)]);

impl Serialize for DetailsParts<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (key, value) in self.0 {
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
}

/// `v` as JSON with its strings longer than `MAX_DETAIL_TEXT_BYTES` cut at a character
/// boundary and ending with a marker giving their full length, e.g.
/// `"xxxx… [cut: 52428800 bytes in the event]"`. Long texts are never copied whole.
struct CutLongTexts<'a>(&'a Value);

impl Serialize for CutLongTexts<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::String(s) if s.len() > MAX_DETAIL_TEXT_BYTES => {
                let mut end = MAX_DETAIL_TEXT_BYTES;
                while !s.is_char_boundary(end) {
                    end -= 1;
                }
                serializer.serialize_str(&format!("{}… [cut: {} bytes in the event]", &s[..end], s.len()))
            }
            Value::Array(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(&CutLongTexts(item))?;
                }
                seq.end()
            }
            Value::Object(fields) => {
                let mut map = serializer.serialize_map(Some(fields.len()))?;
                for (key, value) in fields {
                    map.serialize_entry(key, &CutLongTexts(value))?;
                }
                map.end()
            }
            other => other.serialize(serializer),
        }
    }
}

/// The search document: the summary and the reason first (never cut), then names and
/// titles, then block texts, which may be long and are what the size cap cuts.
fn search_text(e: &Event, summary: &str) -> String {
    let sides = [e.after.as_ref(), e.before.as_ref()];
    let texts_of = |keys: &'static [&'static str]| {
        sides
            .into_iter()
            .flatten()
            .flat_map(move |side| keys.iter().filter_map(move |k| side.get(*k).and_then(Value::as_str)))
    };
    let mut parts = vec![summary, e.reason.as_deref().unwrap_or_default()];
    parts.extend(texts_of(DISPLAY_FIELDS));
    parts.extend(texts_of(&["text"]));
    search::document(&parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::CATALOG;
    use chrono::TimeZone;
    use serde_json::json;

    const TAG_ID: &str = "0190a5c4-9a0e-7cc1-8a42-2f7e3f6c2d11";
    const SHELF_A: &str = "0190a5c4-9a0e-7cc1-8a42-2f7e3f6c2d12";
    const SHELF_B: &str = "0190a5c4-9a0e-7cc1-8a42-2f7e3f6c2d13";
    const BOOK_ID: &str = "0190a5c4-9a0e-7cc1-8a42-2f7e3f6c2d14";

    fn event(event_type: &str, entity_type: &str, before: Option<Value>, after: Option<Value>) -> Event {
        Event {
            id: Uuid::from_u128(1),
            library_id: Uuid::from_u128(2),
            actor_user_id: Some(Uuid::from_u128(3)),
            entity_type: entity_type.to_string(),
            entity_id: Uuid::from_u128(4),
            event_type: event_type.to_string(),
            before,
            after,
            diff: None,
            occurred_at: Utc.with_ymd_and_hms(2024, 5, 1, 12, 0, 0).unwrap(),
            created_at: Utc.with_ymd_and_hms(2024, 5, 1, 12, 0, 1).unwrap(),
            request_id: Some("req-1".to_string()),
            client: Some("web".to_string()),
            reason: None,
            ip: Some("192.0.2.7".to_string()),
        }
    }

    fn invalid(e: &Event) -> String {
        match project(e) {
            Err(err @ ProjectError::InvalidPayload(_)) => {
                assert_eq!(err.error_reason(), ErrorReason::InvalidPayload);
                err.to_string()
            }
            other => panic!("expected invalid_payload, got {other:?}"),
        }
    }

    /// One valid event per catalog type, with the summary and changed fields it gives.
    #[rustfmt::skip]
    fn catalog_cases() -> Vec<(Event, &'static str, Vec<&'static str>)> {
        let none = None;
        vec![
            (event("LibraryCreated", "library", none.clone(), Some(json!({"name": "Home"}))),
             r#"Created library "Home""#, vec!["name"]),
            (event("LibraryRenamed", "library", Some(json!({"name": "Home"})), Some(json!({"name": "Work"}))),
             r#"Renamed library "Home" → "Work""#, vec!["name"]),
            (event("BookshelfCreated", "bookshelf", none.clone(), Some(json!({"name": "Work"}))),
             r#"Created bookshelf "Work""#, vec!["name"]),
            (event("BookshelfRenamed", "bookshelf", Some(json!({"name": "Work"})), Some(json!({"name": "Job"}))),
             r#"Renamed bookshelf "Work" → "Job""#, vec!["name"]),
            (event("BookshelfDeleted", "bookshelf", Some(json!({"name": "Job"})), none.clone()),
             r#"Deleted bookshelf "Job""#, vec!["name"]),
            (event("BookCreated", "book", none.clone(), Some(json!({"title": "Ops", "bookshelf_id": SHELF_A}))),
             r#"Created book "Ops""#, vec!["bookshelf_id", "title"]),
            (event("BookRenamed", "book", Some(json!({"title": "Old"})), Some(json!({"title": "New"}))),
             r#"Renamed book "Old" → "New""#, vec!["title"]),
            (event("BookMoved", "book",
                   Some(json!({"bookshelf_id": SHELF_A, "title": "Ops"})),
                   Some(json!({"bookshelf_id": SHELF_B, "title": "Ops", "bookshelf_name": "Work"}))),
             r#"Moved book "Ops" to bookshelf "Work""#, vec!["bookshelf_id", "bookshelf_name"]),
            (event("BookDeleted", "book", Some(json!({"title": "Ops"})), none.clone()),
             r#"Deleted book "Ops""#, vec!["title"]),
            (event("BookRestored", "book", none.clone(), Some(json!({"title": "Ops"}))),
             r#"Restored book "Ops""#, vec!["title"]),
            (event("BlockCreated", "block", none.clone(),
                   Some(json!({"book_id": BOOK_ID, "kind": "paragraph", "text": "hello", "book_title": "Ops"}))),
             r#"Created paragraph block in "Ops""#, vec!["book_id", "book_title", "kind", "text"]),
            (event("BlockUpdated", "block",
                   Some(json!({"text": "hello", "book_title": "Ops"})),
                   Some(json!({"text": "hello world", "book_title": "Ops"}))),
             r#"Edited block in "Ops""#, vec!["text"]),
            (event("BlockMoved", "block", Some(json!({"position": 3})), Some(json!({"position": 5}))),
             "Moved block from position 3 to 5", vec!["position"]),
            (event("BlockDeleted", "block", Some(json!({"text": "bye"})), none.clone()),
             "Deleted block", vec!["text"]),
            (event("TagCreated", "tag", none.clone(), Some(json!({"name": "rust"}))),
             r#"Created tag "rust""#, vec!["name"]),
            (event("TagRenamed", "tag", Some(json!({"name": "rust"})), Some(json!({"name": "rustlang"}))),
             r#"Renamed tag "rust" → "rustlang""#, vec!["name"]),
            (event("TagDeleted", "tag", Some(json!({"name": "rust"})), none.clone()),
             r#"Deleted tag "rust""#, vec!["name"]),
            (event("TagAdded", "book", none.clone(),
                   Some(json!({"tag_id": TAG_ID, "tag_name": "rust", "book_title": "Ops"}))),
             r#"Added tag "rust" to book "Ops""#, vec!["book_title", "tag_id", "tag_name"]),
            (event("TagRemoved", "block", Some(json!({"tag_id": TAG_ID, "tag_name": "rust"})), none),
             r#"Removed tag "rust" from a block"#, vec!["tag_id", "tag_name"]),
        ]
    }

    #[test]
    fn every_catalog_type_has_a_summary_and_changed_fields() {
        let cases = catalog_cases();
        for ty in EventType::ALL {
            assert!(cases.iter().any(|(e, _, _)| e.event_type == ty.as_str()), "no case for {ty}");
        }
        for (e, summary, changed) in cases {
            let entry = project(&e).unwrap_or_else(|err| panic!("{}: {err}", e.event_type));
            assert_eq!(entry.summary, summary, "{}", e.event_type);
            assert_eq!(entry.changed_fields.to_vec(), changed, "{}", e.event_type);
        }
    }

    /// A value of the kind a catalog field requires.
    fn sample(kind: FieldKind) -> Value {
        match kind {
            FieldKind::Text => json!("sample"),
            FieldKind::Uuid => json!(TAG_ID),
            FieldKind::Integer => json!(7),
        }
    }

    /// A value of another kind than the catalog field requires.
    fn wrong(kind: FieldKind) -> Value {
        match kind {
            FieldKind::Text | FieldKind::Uuid => json!(42),
            FieldKind::Integer => json!("7"),
        }
    }

    fn payload(fields: &[Field]) -> Option<Value> {
        let object: Map<String, Value> = fields.iter().map(|f| (f.name.to_string(), sample(f.kind))).collect();
        (!fields.is_empty()).then_some(Value::Object(object))
    }

    /// The minimal event the catalog accepts for `ty`, built from the catalog itself.
    fn minimal(ty: &EventSpec) -> Event {
        let name = ty.event_type.as_str();
        event(name, ty.entity_types[0], payload(ty.before), payload(ty.after))
    }

    #[test]
    fn every_catalog_type_projects_its_minimal_event_without_display_fields() {
        for ty in CATALOG {
            for entity_type in ty.entity_types {
                let mut e = minimal(ty);
                e.entity_type = entity_type.to_string();
                let entry = project(&e).unwrap_or_else(|err| panic!("{}: {err}", ty.event_type));
                assert!(!entry.summary.is_empty() && !entry.summary.contains("\"\""), "{}", entry.summary);
            }
        }
    }

    /// `e` with field `name` of its `side` payload set to `value`, or removed.
    fn with_field(mut e: Event, side: &str, name: &str, value: Option<Value>) -> Event {
        let payload = if side == "before" { &mut e.before } else { &mut e.after };
        let Some(Value::Object(object)) = payload else { panic!("no {side} object") };
        match value {
            Some(v) => object.insert(name.to_string(), v),
            None => object.remove(name),
        };
        e
    }

    #[test]
    fn every_required_field_is_checked_for_presence_and_kind() {
        for ty in CATALOG {
            let name = ty.event_type;
            for (side, fields) in [("before", ty.before), ("after", ty.after)] {
                for f in fields {
                    let missing = with_field(minimal(ty), side, f.name, None);
                    assert_eq!(invalid(&missing), format!("{name}: {side}.{} is missing", f.name));
                    let mistyped = with_field(minimal(ty), side, f.name, Some(wrong(f.kind)));
                    let message = invalid(&mistyped);
                    assert!(message.starts_with(&format!("{name}: {side}.{} must be ", f.name)), "{message}");
                }
            }
        }
    }

    #[test]
    fn wrong_kind_messages_say_what_was_expected_and_found() {
        let e = event("BookRenamed", "book", Some(json!({"title": "Old"})), Some(json!({"title": 5})));
        assert_eq!(invalid(&e), "BookRenamed: after.title must be a string, got number");
        let e = event("BookRenamed", "book", Some(json!({"title": "Old"})), Some(json!({"title": null})));
        assert_eq!(invalid(&e), "BookRenamed: after.title must be a string, got null");
        let e = event(
            "BookMoved",
            "book",
            Some(json!({"bookshelf_id": "shelf-1"})),
            Some(json!({"bookshelf_id": SHELF_B})),
        );
        assert_eq!(
            invalid(&e),
            r#"BookMoved: before.bookshelf_id must be a UUID string, got "shelf-1", which is not a UUID"#
        );
        let e = event("BlockMoved", "block", Some(json!({"position": 3})), Some(json!({"position": 5.5})));
        assert_eq!(invalid(&e), "BlockMoved: after.position must be an integer, got 5.5, which is not an integer");
    }

    #[test]
    fn payload_that_must_carry_fields_must_be_an_object() {
        let e = event("BookRenamed", "book", Some(json!({"title": "Old"})), Some(json!(["New"])));
        assert_eq!(invalid(&e), "BookRenamed: after must be an object, got array");
        let e = event("BookRenamed", "book", Some(json!("Old")), Some(json!({"title": "New"})));
        assert_eq!(invalid(&e), "BookRenamed: before must be an object, got string");
        let e = event("BookRenamed", "book", None, Some(json!({"title": "New"})));
        assert_eq!(invalid(&e), "BookRenamed: before is missing");
        let e = event("BookRenamed", "book", Some(json!({"title": "Old"})), Some(Value::Null));
        assert_eq!(invalid(&e), "BookRenamed: after is missing");
    }

    #[test]
    fn a_side_without_required_fields_may_be_anything() {
        let e = event(
            "BookCreated",
            "book",
            Some(json!("ignored")),
            Some(json!({"title": "Ops", "bookshelf_id": SHELF_A})),
        );
        assert_eq!(details_of(&e)["before"], json!("ignored"));
    }

    #[test]
    fn entity_type_must_be_one_the_event_type_allows() {
        let e = event("BookRenamed", "tag", Some(json!({"title": "Old"})), Some(json!({"title": "New"})));
        assert_eq!(invalid(&e), r#"BookRenamed: entity_type "tag" is not allowed, expected book"#);
        let e = event("TagAdded", "library", None, Some(json!({"tag_id": TAG_ID, "tag_name": "rust"})));
        assert_eq!(invalid(&e), r#"TagAdded: entity_type "library" is not allowed, expected book or block"#);
    }

    #[test]
    fn unknown_event_types_are_refused_case_sensitively() {
        for name in ["BookExploded", "bookrenamed", "BookRenamed ", ""] {
            let e = event(name, "book", Some(json!({"title": "Old"})), Some(json!({"title": "New"})));
            let err = project(&e).expect_err(name);
            assert_eq!(err, ProjectError::UnknownEventType(name.to_string()));
            assert_eq!(err.error_reason(), ErrorReason::UnknownEventType);
        }
        let err = ProjectError::UnknownEventType("BookExploded".to_string());
        assert_eq!(err.to_string(), r#"unknown event type "BookExploded": not in the event catalog of this version"#);
    }

    #[test]
    fn chinese_titles_are_quoted_and_searchable() {
        let e = event("BookRenamed", "book", Some(json!({"title": "旧标题"})), Some(json!({"title": "新标题"})));
        let entry = project(&e).expect("projects");
        assert_eq!(entry.summary, r#"Renamed book "旧标题" → "新标题""#);
        let tokens: Vec<&str> = entry.search_text.split(' ').collect();
        assert!(tokens.contains(&"标题"), "{}", entry.search_text);

        let e = event("BookCreated", "book", None, Some(json!({"title": "分布式系统设计", "bookshelf_id": SHELF_A})));
        let entry = project(&e).expect("projects");
        assert!(entry.search_text.split(' ').any(|t| t == "系统"), "{}", entry.search_text);
    }

    #[test]
    fn display_fields_enrich_summaries_and_are_optional() {
        let moved = |before: Value, after: Value| {
            project(&event("BookMoved", "book", Some(before), Some(after))).map(|x| x.summary)
        };
        assert_eq!(
            moved(json!({"bookshelf_id": SHELF_A}), json!({"bookshelf_id": SHELF_B})),
            Ok("Moved book to another bookshelf".to_string())
        );
        assert_eq!(
            moved(
                json!({"bookshelf_id": SHELF_A, "bookshelf_name": "Home"}),
                json!({"bookshelf_id": SHELF_B, "bookshelf_name": "Work"})
            ),
            Ok(r#"Moved book from bookshelf "Home" to bookshelf "Work""#.to_string())
        );
        assert_eq!(
            moved(json!({"bookshelf_id": SHELF_A, "title": "Ops"}), json!({"bookshelf_id": SHELF_B})),
            Ok(r#"Moved book "Ops" to another bookshelf"#.to_string())
        );

        let block = event("BlockUpdated", "block", Some(json!({"text": "a"})), Some(json!({"text": "b"})));
        assert_eq!(project(&block).expect("projects").summary, "Edited block");
        let block = event(
            "BlockMoved",
            "block",
            Some(json!({"position": 0, "book_title": "Ops"})),
            Some(json!({"position": 1})),
        );
        assert_eq!(project(&block).expect("projects").summary, r#"Moved block in "Ops" from position 0 to 1"#);

        let shelf = json!({"title": "Ops", "bookshelf_id": SHELF_A, "bookshelf_name": "Work"});
        let created = event("BookCreated", "book", None, Some(shelf));
        assert_eq!(project(&created).expect("projects").summary, r#"Created book "Ops" in bookshelf "Work""#);
    }

    #[test]
    fn tag_summaries_name_the_book_or_the_block() {
        let tag = json!({"tag_id": TAG_ID, "tag_name": "rust"});
        let with_title = json!({"tag_id": TAG_ID, "tag_name": "rust", "book_title": "Ops"});
        let added = |entity: &str, after: &Value| {
            project(&event("TagAdded", entity, None, Some(after.clone()))).map(|x| x.summary)
        };
        let removed = |entity: &str, before: &Value| {
            project(&event("TagRemoved", entity, Some(before.clone()), None)).map(|x| x.summary)
        };
        assert_eq!(added("book", &with_title), Ok(r#"Added tag "rust" to book "Ops""#.to_string()));
        assert_eq!(added("book", &tag), Ok(r#"Added tag "rust" to a book"#.to_string()));
        assert_eq!(added("block", &with_title), Ok(r#"Added tag "rust" to block in "Ops""#.to_string()));
        assert_eq!(added("block", &tag), Ok(r#"Added tag "rust" to a block"#.to_string()));
        assert_eq!(removed("book", &with_title), Ok(r#"Removed tag "rust" from book "Ops""#.to_string()));
        assert_eq!(removed("block", &with_title), Ok(r#"Removed tag "rust" from block in "Ops""#.to_string()));
    }

    #[test]
    fn long_or_multiline_values_are_clipped_to_one_line_in_summaries() {
        let long = "x".repeat(500);
        let e = event("BookRestored", "book", None, Some(json!({"title": long})));
        let summary = project(&e).expect("projects").summary;
        assert_eq!(summary, format!("Restored book \"{}…\"", "x".repeat(MAX_QUOTED_CHARS)));

        let e = event("TagCreated", "tag", None, Some(json!({"name": "a\n\tb  c"})));
        assert_eq!(project(&e).expect("projects").summary, r#"Created tag "a b c""#);

        let e = event("BlockCreated", "block", None, Some(json!({"book_id": BOOK_ID, "kind": " ", "text": "t"})));
        assert_eq!(project(&e).expect("projects").summary, "Created block");
    }

    #[test]
    fn changed_fields_compare_values_and_include_diff_keys() {
        let mut e = event(
            "BlockUpdated",
            "block",
            Some(json!({"text": "a", "same": 1, "gone": true, "nulled": null})),
            Some(json!({"text": "b", "same": 1, "added": [1]})),
        );
        e.diff = Some(json!({"ops": [], "text": "patch"}));
        let entry = project(&e).expect("projects");
        assert_eq!(entry.changed_fields.to_vec(), ["added", "gone", "ops", "text"]);

        e.diff = Some(json!(["not", "an", "object"]));
        assert_eq!(project(&e).expect("projects").changed_fields.to_vec(), ["added", "gone", "text"]);
    }

    #[test]
    fn changed_fields_keep_every_name_in_order_empty_ones_included() {
        let fields: ChangedFields = ["", "a", "é名", ""].into_iter().collect();
        assert_eq!(fields.len(), 4);
        assert_eq!(fields.to_vec(), ["", "a", "é名", ""]);
        assert_eq!(fields.text_len(), "aé名".len());
        let none: ChangedFields = std::iter::empty().collect();
        assert!(none.is_empty() && none.iter().next().is_none());
    }

    fn details_of(e: &Event) -> Value {
        let text = project(e).expect("projects").details;
        serde_json::from_str(&text).expect("details are JSON")
    }

    #[test]
    fn long_texts_are_cut_in_details_with_their_full_length() {
        let long = "é".repeat(3000); // 6000 bytes, two per character
        let e = event(
            "BookRenamed",
            "book",
            Some(json!({"title": "Old"})),
            Some(json!({"title": "New", "notes": [long.clone()], "n": {"t": long}})),
        );
        let details = details_of(&e);
        let cut = format!("{}… [cut: 6000 bytes in the event]", "é".repeat(2048));
        assert_eq!(details["after"]["notes"][0], json!(cut));
        assert_eq!(details["after"]["n"]["t"], json!(cut));
        assert_eq!(details["after"]["title"], json!("New"));
        assert_eq!(details["before"], json!({"title": "Old"}));
        let exact = "x".repeat(MAX_DETAIL_TEXT_BYTES);
        let e = event("BookRenamed", "book", Some(json!({"title": "Old"})), Some(json!({"title": "New", "t": exact})));
        assert_eq!(details_of(&e)["after"]["t"], json!(exact), "4 KiB is kept whole");
    }

    #[test]
    fn details_hold_only_the_parts_present() {
        let mut e =
            event("BookRenamed", "book", Some(json!({"title": "Old"})), Some(json!({"title": "New", "extra": 1})));
        assert_eq!(details_of(&e), json!({"before": {"title": "Old"}, "after": {"title": "New", "extra": 1}}));
        e.diff = Some(json!({"title": ["Old", "New"]}));
        assert_eq!(details_of(&e)["diff"], json!({"title": ["Old", "New"]}));
        e.diff = Some(Value::Null);
        assert!(details_of(&e).get("diff").is_none());
        let e = event("LibraryCreated", "library", None, Some(json!({"name": "Home"})));
        assert_eq!(details_of(&e), json!({"after": {"name": "Home"}}));
    }

    #[test]
    fn context_columns_are_copied_from_the_event() {
        let mut e = event("TagCreated", "tag", None, Some(json!({"name": "rust"})));
        e.reason = Some("cleanup".to_string());
        let entry = project(&e).expect("projects");
        assert_eq!(entry.id, e.id);
        assert_eq!(entry.library_id, e.library_id);
        assert_eq!(entry.actor_user_id, e.actor_user_id);
        assert_eq!(entry.entity_type, e.entity_type);
        assert_eq!(entry.entity_id, e.entity_id);
        assert_eq!(entry.event_type, e.event_type);
        assert_eq!(entry.occurred_at, e.occurred_at);
        assert_eq!(entry.created_at, e.created_at);
        assert_eq!(entry.request_id, e.request_id);
        assert_eq!(entry.client, e.client);
        assert_eq!(entry.ip, e.ip);
        assert_eq!(entry.reason, e.reason);
        assert_eq!(entry.projection_version, PROJECTION_VERSION);
    }

    #[test]
    fn search_text_covers_summary_reason_names_and_texts() {
        let mut e = event(
            "BlockUpdated",
            "block",
            Some(json!({"text": "Alpha draft", "book_title": "Runbook"})),
            Some(json!({"text": "Beta final", "book_title": "Runbook", "secret": "hidden"})),
        );
        e.reason = Some("Typo fix".to_string());
        let text = project(&e).expect("projects").search_text;
        assert!(text.starts_with("edited block in runbook typo fix"), "{text}");
        for word in ["alpha", "draft", "beta", "final", "runbook"] {
            assert!(text.split(' ').any(|t| t == word), "{word} not in {text}");
        }
        assert!(!text.contains("hidden"), "{text}");
    }

    #[test]
    fn huge_payloads_give_a_capped_search_text_that_keeps_the_summary() {
        let huge = "lorem ipsum ".repeat(200_000);
        let mut e =
            event("BlockCreated", "block", None, Some(json!({"book_id": BOOK_ID, "kind": "code", "text": huge})));
        e.reason = Some("import".to_string());
        let entry = project(&e).expect("projects");
        assert!(entry.search_text.len() <= search::MAX_DOCUMENT_BYTES);
        assert!(entry.search_text.starts_with("created code block import lorem"), "{}", &entry.search_text[..40]);
    }

    /// Every catalog type with Chinese names and titles: the summary written out by hand,
    /// and the two-character words a reader would search for, each a search token.
    #[test]
    fn every_catalog_type_in_chinese_has_its_summary_and_search_words() {
        let none = None;
        #[rustfmt::skip]
        let cases: Vec<(Event, &str, Vec<&str>)> = vec![
            (event("LibraryCreated", "library", none.clone(), Some(json!({"name": "家庭藏书"}))),
             r#"Created library "家庭藏书""#, vec!["家庭", "藏书"]),
            (event("LibraryRenamed", "library", Some(json!({"name": "家庭藏书"})), Some(json!({"name": "工作资料"}))),
             r#"Renamed library "家庭藏书" → "工作资料""#, vec!["家庭", "工作", "资料"]),
            (event("BookshelfCreated", "bookshelf", none.clone(), Some(json!({"name": "技术书架"}))),
             r#"Created bookshelf "技术书架""#, vec!["技术", "书架"]),
            (event("BookshelfRenamed", "bookshelf", Some(json!({"name": "技术书架"})), Some(json!({"name": "架构笔记"}))),
             r#"Renamed bookshelf "技术书架" → "架构笔记""#, vec!["技术", "架构", "笔记"]),
            (event("BookshelfDeleted", "bookshelf", Some(json!({"name": "旧书架"})), none.clone()),
             r#"Deleted bookshelf "旧书架""#, vec!["书架"]),
            (event("BookCreated", "book", none.clone(), Some(json!({"title": "分布式系统设计", "bookshelf_id": SHELF_A}))),
             r#"Created book "分布式系统设计""#, vec!["分布", "系统", "设计"]),
            (event("BookRenamed", "book", Some(json!({"title": "旧标题"})), Some(json!({"title": "新标题"}))),
             r#"Renamed book "旧标题" → "新标题""#, vec!["标题"]),
            (event("BookMoved", "book",
                   Some(json!({"bookshelf_id": SHELF_A, "title": "运维手册"})),
                   Some(json!({"bookshelf_id": SHELF_B, "title": "运维手册", "bookshelf_name": "工作"}))),
             r#"Moved book "运维手册" to bookshelf "工作""#, vec!["运维", "手册", "工作"]),
            (event("BookDeleted", "book", Some(json!({"title": "草稿本"})), none.clone()),
             r#"Deleted book "草稿本""#, vec!["草稿"]),
            (event("BookRestored", "book", none.clone(), Some(json!({"title": "草稿本"}))),
             r#"Restored book "草稿本""#, vec!["草稿"]),
            (event("BlockCreated", "block", none.clone(),
                   Some(json!({"book_id": BOOK_ID, "kind": "paragraph", "text": "你好世界", "book_title": "运维手册"}))),
             r#"Created paragraph block in "运维手册""#, vec!["运维", "手册", "世界"]),
            (event("BlockUpdated", "block",
                   Some(json!({"text": "初稿", "book_title": "运维手册"})),
                   Some(json!({"text": "定稿", "book_title": "运维手册"}))),
             r#"Edited block in "运维手册""#, vec!["手册", "初稿", "定稿"]),
            (event("BlockMoved", "block", Some(json!({"position": 3})), Some(json!({"position": 5}))),
             "Moved block from position 3 to 5", vec![]),
            (event("BlockDeleted", "block", Some(json!({"text": "再见"})), none.clone()),
             "Deleted block", vec![]),
            (event("TagCreated", "tag", none.clone(), Some(json!({"name": "数据库"}))),
             r#"Created tag "数据库""#, vec!["数据"]),
            (event("TagRenamed", "tag", Some(json!({"name": "数据库"})), Some(json!({"name": "存储引擎"}))),
             r#"Renamed tag "数据库" → "存储引擎""#, vec!["数据", "存储", "引擎"]),
            (event("TagDeleted", "tag", Some(json!({"name": "存储引擎"})), none.clone()),
             r#"Deleted tag "存储引擎""#, vec!["引擎"]),
            (event("TagAdded", "book", none.clone(),
                   Some(json!({"tag_id": TAG_ID, "tag_name": "数据库", "book_title": "运维手册"}))),
             r#"Added tag "数据库" to book "运维手册""#, vec!["数据", "手册"]),
            (event("TagRemoved", "block", Some(json!({"tag_id": TAG_ID, "tag_name": "数据库"})), none),
             r#"Removed tag "数据库" from a block"#, vec!["数据"]),
        ];
        for ty in EventType::ALL {
            assert!(cases.iter().any(|(e, _, _)| e.event_type == ty.as_str()), "no Chinese case for {ty}");
        }
        for (e, summary, words) in cases {
            let entry = project(&e).unwrap_or_else(|err| panic!("{}: {err}", e.event_type));
            assert_eq!(entry.summary, summary, "{}", e.event_type);
            let tokens: Vec<&str> = entry.search_text.split(' ').collect();
            for w in words {
                assert!(tokens.contains(&w), "{}: {w} is not a search token of {:?}", e.event_type, entry.search_text);
            }
        }
    }
}
