//! The event model and the event catalog (docs/DESIGN.md §2).
//!
//! The event types are one closed enum, `EventType`, and the catalog one table: for each
//! type, the entity types it may concern and the payload fields `before` and `after`
//! must carry. `append` and `inject` validate against it, and the projector reads it, so
//! there is one definition of what a well-formed event is.

use std::fmt;

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

/// The entity types an event may concern.
pub const ENTITY_TYPES: &[&str] = &["library", "bookshelf", "book", "block", "tag"];

/// The JSON type a required payload field must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    /// A JSON string.
    Text,
    /// A JSON string holding a UUID.
    Uuid,
    /// A JSON number that is an integer.
    Integer,
}

impl FieldKind {
    pub fn describe(self) -> &'static str {
        match self {
            FieldKind::Text => "a string",
            FieldKind::Uuid => "a UUID string",
            FieldKind::Integer => "an integer",
        }
    }

    /// Whether `v` is of this kind.
    pub fn accepts(self, v: &Value) -> bool {
        match self {
            FieldKind::Text => v.is_string(),
            FieldKind::Uuid => v.as_str().is_some_and(|s| Uuid::parse_str(s).is_ok()),
            FieldKind::Integer => v.is_i64() || v.is_u64(),
        }
    }
}

/// A required payload field.
#[derive(Debug, Clone, Copy)]
pub struct Field {
    pub name: &'static str,
    pub kind: FieldKind,
}

const fn text(name: &'static str) -> Field {
    Field { name, kind: FieldKind::Text }
}
const fn uuid(name: &'static str) -> Field {
    Field { name, kind: FieldKind::Uuid }
}
const fn integer(name: &'static str) -> Field {
    Field { name, kind: FieldKind::Integer }
}

/// The event types of the catalog: a closed list. The stored column is text, so an
/// event may name a type that is not here; the projector refuses it as
/// `unknown_event_type` (docs/DESIGN.md §3). A new type needs a variant here, its name
/// in `as_str`, a place at the end of `ALL` and a row at the end of `CATALOG`, a summary
/// in the projection, and its name in the unit tests' hand-written list and in the docs'
/// tables. The compiler refuses a missing name or summary and a `CATALOG` out of step
/// with `ALL`; the tests compare `ALL` with the hand-written list and the docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventType {
    LibraryCreated,
    LibraryRenamed,
    BookshelfCreated,
    BookshelfRenamed,
    BookshelfDeleted,
    BookCreated,
    BookRenamed,
    BookMoved,
    BookDeleted,
    BookRestored,
    BlockCreated,
    BlockUpdated,
    BlockMoved,
    BlockDeleted,
    TagCreated,
    TagRenamed,
    TagDeleted,
    TagAdded,
    TagRemoved,
}

impl EventType {
    /// Every type, in catalog order.
    pub const ALL: [EventType; 19] = [
        EventType::LibraryCreated,
        EventType::LibraryRenamed,
        EventType::BookshelfCreated,
        EventType::BookshelfRenamed,
        EventType::BookshelfDeleted,
        EventType::BookCreated,
        EventType::BookRenamed,
        EventType::BookMoved,
        EventType::BookDeleted,
        EventType::BookRestored,
        EventType::BlockCreated,
        EventType::BlockUpdated,
        EventType::BlockMoved,
        EventType::BlockDeleted,
        EventType::TagCreated,
        EventType::TagRenamed,
        EventType::TagDeleted,
        EventType::TagAdded,
        EventType::TagRemoved,
    ];

    /// The name stored in `chronicle_events.event_type`.
    pub const fn as_str(self) -> &'static str {
        match self {
            EventType::LibraryCreated => "LibraryCreated",
            EventType::LibraryRenamed => "LibraryRenamed",
            EventType::BookshelfCreated => "BookshelfCreated",
            EventType::BookshelfRenamed => "BookshelfRenamed",
            EventType::BookshelfDeleted => "BookshelfDeleted",
            EventType::BookCreated => "BookCreated",
            EventType::BookRenamed => "BookRenamed",
            EventType::BookMoved => "BookMoved",
            EventType::BookDeleted => "BookDeleted",
            EventType::BookRestored => "BookRestored",
            EventType::BlockCreated => "BlockCreated",
            EventType::BlockUpdated => "BlockUpdated",
            EventType::BlockMoved => "BlockMoved",
            EventType::BlockDeleted => "BlockDeleted",
            EventType::TagCreated => "TagCreated",
            EventType::TagRenamed => "TagRenamed",
            EventType::TagDeleted => "TagDeleted",
            EventType::TagAdded => "TagAdded",
            EventType::TagRemoved => "TagRemoved",
        }
    }

    /// The type named `name`, if it is one; names are case-sensitive.
    pub fn parse(name: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|t| t.as_str() == name)
    }

    /// The catalog row of this type.
    pub const fn spec(self) -> &'static EventSpec {
        &CATALOG[self as usize]
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One row of the catalog.
#[derive(Debug)]
pub struct EventSpec {
    pub event_type: EventType,
    pub entity_types: &'static [&'static str],
    pub before: &'static [Field],
    pub after: &'static [Field],
}

macro_rules! catalog {
    ($( $ty:ident : [$($et:literal),+] before [$($b:expr),*] after [$($a:expr),*] ;)*) => {
        &[$( EventSpec {
            event_type: EventType::$ty,
            entity_types: &[$($et),+],
            before: &[$($b),*],
            after: &[$($a),*],
        } ),*]
    };
}

/// The event catalog of docs/DESIGN.md §2, one row per `EventType` in `ALL`'s order;
/// more payload fields than these are allowed and kept.
pub const CATALOG: &[EventSpec] = catalog! {
    LibraryCreated:   ["library"]       before []                                    after [text("name")];
    LibraryRenamed:   ["library"]       before [text("name")]                        after [text("name")];
    BookshelfCreated: ["bookshelf"]     before []                                    after [text("name")];
    BookshelfRenamed: ["bookshelf"]     before [text("name")]                        after [text("name")];
    BookshelfDeleted: ["bookshelf"]     before [text("name")]                        after [];
    BookCreated:      ["book"]          before []                                    after [text("title"), uuid("bookshelf_id")];
    BookRenamed:      ["book"]          before [text("title")]                       after [text("title")];
    BookMoved:        ["book"]          before [uuid("bookshelf_id")]                after [uuid("bookshelf_id")];
    BookDeleted:      ["book"]          before [text("title")]                       after [];
    BookRestored:     ["book"]          before []                                    after [text("title")];
    BlockCreated:     ["block"]         before []                                    after [uuid("book_id"), text("kind"), text("text")];
    BlockUpdated:     ["block"]         before [text("text")]                        after [text("text")];
    BlockMoved:       ["block"]         before [integer("position")]                 after [integer("position")];
    BlockDeleted:     ["block"]         before [text("text")]                        after [];
    TagCreated:       ["tag"]           before []                                    after [text("name")];
    TagRenamed:       ["tag"]           before [text("name")]                        after [text("name")];
    TagDeleted:       ["tag"]           before [text("name")]                        after [];
    TagAdded:         ["book", "block"] before []                                    after [uuid("tag_id"), text("tag_name")];
    TagRemoved:       ["book", "block"] before [uuid("tag_id"), text("tag_name")]    after [];
};

// `ALL` and `CATALOG` follow the declaration order, so `spec` can index the catalog.
const _: () = {
    assert!(CATALOG.len() == EventType::ALL.len());
    let mut i = 0;
    while i < CATALOG.len() {
        assert!(EventType::ALL[i] as usize == i);
        assert!(CATALOG[i].event_type as usize == i);
        i += 1;
    }
};

/// One row of `chronicle_events`, as the projector and the writers see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub id: Uuid,
    pub library_id: Uuid,
    pub actor_user_id: Option<Uuid>,
    pub entity_type: String,
    pub entity_id: Uuid,
    pub event_type: String,
    pub before: Option<Value>,
    pub after: Option<Value>,
    pub diff: Option<Value>,
    pub occurred_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub request_id: Option<String>,
    pub client: Option<String>,
    pub reason: Option<String>,
    /// The `inet` as PostgreSQL shows it (`abbrev`): the address, and its netmask unless
    /// it is the whole address (`10.1.2.3/8`, `2001:db8::1/64`, `192.0.2.7`).
    pub ip: Option<String>,
}

/// The columns of `chronicle_events` in the order `Event::from_row` reads them. `ip` is
/// read as text: the driver's address type has no netmask.
pub const EVENT_COLUMNS: &str = "id, library_id, actor_user_id, entity_type, entity_id, event_type, \
     before, after, diff, occurred_at, created_at, request_id, client, reason, abbrev(ip) AS ip";

impl Event {
    /// Reads an event from a row selected with `EVENT_COLUMNS` (possibly prefixed by
    /// other columns: `offset` is the index of `id`).
    pub fn from_row(row: &postgres::Row, offset: usize) -> Result<Event, postgres::Error> {
        let o = offset;
        Ok(Event {
            id: row.try_get(o)?,
            library_id: row.try_get(o + 1)?,
            actor_user_id: row.try_get(o + 2)?,
            entity_type: row.try_get(o + 3)?,
            entity_id: row.try_get(o + 4)?,
            event_type: row.try_get(o + 5)?,
            before: row.try_get(o + 6)?,
            after: row.try_get(o + 7)?,
            diff: row.try_get(o + 8)?,
            occurred_at: row.try_get(o + 9)?,
            created_at: row.try_get(o + 10)?,
            request_id: row.try_get(o + 11)?,
            client: row.try_get(o + 12)?,
            reason: row.try_get(o + 13)?,
            ip: row.try_get(o + 14)?,
        })
    }
}

/// An event row the driver cannot read although PostgreSQL stored it: jsonb nested past
/// serde_json's 128 levels, an `infinity` timestamp. It can
/// never be projected by this version: a deterministic `invalid_payload`, for that event
/// alone.
#[derive(Debug, Clone, PartialEq)]
pub struct Unreadable {
    pub id: Uuid,
    pub error: String,
    /// Not read at all: larger than `OUTBOX_MAX_EVENT_BYTES` (`error` says so).
    pub too_large: bool,
}

impl Unreadable {
    pub fn message(&self) -> String {
        if self.too_large {
            return self.error.clone();
        }
        format!("event {} cannot be read by this version: {}", self.id, self.error)
    }
}

/// Reads an event from a row (see `Event::from_row`), or says why it cannot be read.
/// Only an unreadable `id` (the primary key: never) is an error of the query itself.
pub fn read_event(row: &postgres::Row, offset: usize) -> Result<Result<Event, Unreadable>, postgres::Error> {
    let id: Uuid = row.try_get(offset)?;
    Ok(Event::from_row(row, offset).map_err(|e| Unreadable {
        id,
        error: crate::sqlstate::describe_error(&e),
        too_large: false,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The catalog's names as docs/DESIGN.md §2 lists them, written out by hand.
    const NAMES: [&str; 19] = [
        "LibraryCreated",
        "LibraryRenamed",
        "BookshelfCreated",
        "BookshelfRenamed",
        "BookshelfDeleted",
        "BookCreated",
        "BookRenamed",
        "BookMoved",
        "BookDeleted",
        "BookRestored",
        "BlockCreated",
        "BlockUpdated",
        "BlockMoved",
        "BlockDeleted",
        "TagCreated",
        "TagRenamed",
        "TagDeleted",
        "TagAdded",
        "TagRemoved",
    ];

    #[test]
    fn the_types_are_the_catalog_names_and_parse_case_sensitively() {
        assert_eq!(EventType::ALL.map(EventType::as_str), NAMES);
        for t in EventType::ALL {
            assert_eq!(EventType::parse(t.as_str()), Some(t));
            assert_eq!(t.to_string(), t.as_str());
            assert_eq!(t.spec().event_type, t);
        }
        for bad in ["", "bookrenamed", "BOOKRENAMED", "BookRenamed ", " BookRenamed", "BookExploded"] {
            assert_eq!(EventType::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn catalog_entity_types_are_known() {
        for spec in CATALOG {
            for et in spec.entity_types {
                assert!(ENTITY_TYPES.contains(et), "{}: unknown entity type {et}", spec.event_type);
            }
        }
        assert_eq!(CATALOG.len(), NAMES.len());
    }

    /// The rows of the table of `doc` whose header starts with `| event_type | entity_type |`,
    /// as cells with backticks and `(UUID)`-like notes removed.
    fn type_table(doc: &str) -> Vec<Vec<String>> {
        let clean = |cell: &str| {
            let cell = cell.replace('`', "");
            let mut out = String::new();
            let mut depth = 0;
            for c in cell.chars() {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    _ if depth == 0 => out.push(c),
                    _ => {}
                }
            }
            out.split(", ").map(str::trim).collect::<Vec<_>>().join(", ")
        };
        doc.lines()
            .skip_while(|l| !l.starts_with("| event_type | entity_type |"))
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .map(|l| l.trim_matches('|').split('|').map(clean).collect())
            .collect()
    }

    /// docs/DESIGN.md §2 and docs/events.md list the catalog as it is: every type, in
    /// order, with its entity types and required fields.
    #[test]
    fn the_docs_list_the_catalog() {
        let fields = |fs: &[Field]| match fs {
            [] => "—".to_string(),
            fs => fs.iter().map(|f| f.name).collect::<Vec<_>>().join(", "),
        };
        for (doc, text) in [
            ("docs/DESIGN.md", include_str!("../docs/DESIGN.md")),
            ("docs/events.md", include_str!("../docs/events.md")),
        ] {
            let rows = type_table(text);
            let names: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
            assert_eq!(names, NAMES, "{doc}");
            for (row, spec) in rows.iter().zip(CATALOG) {
                let expected = [spec.entity_types.join(" or "), fields(spec.before), fields(spec.after)];
                assert_eq!(row[1..4], expected, "{doc}: {}", spec.event_type);
            }
        }
    }

    #[test]
    fn field_kinds_check_json_types() {
        assert!(FieldKind::Text.accepts(&Value::from("x")));
        assert!(!FieldKind::Text.accepts(&Value::from(1)));
        assert!(FieldKind::Uuid.accepts(&Value::from("0190a5c4-9a0e-7cc1-8a42-2f7e3f6c2d11")));
        assert!(!FieldKind::Uuid.accepts(&Value::from("not-a-uuid")));
        assert!(FieldKind::Integer.accepts(&Value::from(3)));
        assert!(!FieldKind::Integer.accepts(&Value::from(3.5)));
        assert!(!FieldKind::Integer.accepts(&Value::from("3")));
    }
}
