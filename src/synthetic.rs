//! Realistic synthetic events, reproducibly: what `chronicle inject` writes, for demos,
//! load tests and benchmarks of the worker.
//!
//! Events look like a notes application's: every catalog type, English and Chinese titles
//! and texts, several actors and clients per library, system events, and entities that
//! hang together (a book is renamed from its previous title, a block is edited from its
//! previous text). Everything is derived from the seed — ids and times too, never the
//! clock — so the same seed gives byte-identical events, which makes a benchmark or a bug
//! report repeatable. Pure: a seed in, the same events out, on every platform.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use chrono::{DateTime, TimeZone, Utc};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::event::EventType;
use crate::input::NewEvent;

/// SplitMix64: tiny, fast, and good enough for synthetic data; integer-only, so the
/// stream is the same everywhere.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }

    /// True `per_mille` times in a thousand.
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.index(items.len())]
    }

    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        for chunk in out.chunks_mut(8) {
            let r = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&r[..chunk.len()]);
        }
        out
    }

    /// A UUIDv7 whose time is `ms` and whose random bits come from the seed.
    fn uuid_v7(&mut self, ms: u64) -> Uuid {
        uuid::Builder::from_unix_timestamp_millis(ms, &self.bytes::<10>()).into_uuid()
    }

    fn uuid_v4(&mut self) -> Uuid {
        uuid::Builder::from_random_bytes(self.bytes::<16>()).into_uuid()
    }
}

/// The end of the 90-day window of seed 0; other seeds move it back by up to 180 days.
const WINDOW_END_UNIX: i64 = 1_748_736_000; // 2025-06-01T00:00:00Z
const WINDOW_US: i64 = 90 * 86_400 * 1_000_000;

/// How often (per mille) each event type is drawn once a library exists.
/// LibraryCreated is not drawn: it is always a library's first event.
const TYPE_WEIGHTS: &[(EventType, u64)] = &[
    (EventType::LibraryRenamed, 8),
    (EventType::BookshelfCreated, 25),
    (EventType::BookshelfRenamed, 12),
    (EventType::BookshelfDeleted, 10),
    (EventType::BookCreated, 60),
    (EventType::BookRenamed, 30),
    (EventType::BookMoved, 20),
    (EventType::BookDeleted, 15),
    (EventType::BookRestored, 8),
    (EventType::BlockCreated, 240),
    (EventType::BlockUpdated, 300),
    (EventType::BlockMoved, 50),
    (EventType::BlockDeleted, 40),
    (EventType::TagCreated, 20),
    (EventType::TagRenamed, 10),
    (EventType::TagDeleted, 7),
    (EventType::TagAdded, 45),
    (EventType::TagRemoved, 20),
];

/// What to write instead when a drawn type has nothing to act on (no block to edit…).
fn fallback(event_type: EventType) -> EventType {
    match event_type {
        EventType::BookshelfRenamed | EventType::BookshelfDeleted | EventType::BookCreated => {
            EventType::BookshelfCreated
        }
        EventType::BookRenamed | EventType::BookMoved | EventType::BookDeleted | EventType::BlockCreated => {
            EventType::BookCreated
        }
        EventType::BookRestored => EventType::BookDeleted,
        EventType::BlockUpdated | EventType::BlockMoved | EventType::BlockDeleted => EventType::BlockCreated,
        EventType::TagCreated => EventType::TagRenamed,
        EventType::TagRenamed | EventType::TagDeleted | EventType::TagAdded => EventType::TagCreated,
        EventType::TagRemoved => EventType::TagAdded,
        EventType::BookshelfCreated => EventType::BookshelfRenamed,
        EventType::LibraryCreated | EventType::LibraryRenamed => EventType::LibraryRenamed,
    }
}

#[derive(Debug, Clone)]
struct Actor {
    id: Uuid,
    client: &'static str,
    ip: IpAddr,
}

#[derive(Debug, Clone)]
struct Shelf {
    id: Uuid,
    name: String,
}

#[derive(Debug, Clone)]
struct Book {
    id: Uuid,
    title: String,
    shelf_id: Uuid,
    blocks: u32,
}

#[derive(Debug, Clone)]
struct Block {
    id: Uuid,
    book_id: Uuid,
    kind: &'static str,
    text: String,
    position: u32,
}

#[derive(Debug, Clone)]
struct Tag {
    id: Uuid,
    name: String,
}

#[derive(Debug, Clone)]
struct Link {
    tag_id: Uuid,
    entity_type: &'static str,
    entity_id: Uuid,
    book_id: Uuid,
}

/// One library's state: what exists, so the next event can act on it. Only a bounded
/// number of things is remembered (see `Caps`); forgotten ones simply get no more events.
#[derive(Debug, Clone, Default)]
struct Library {
    id: Uuid,
    name: String,
    started: bool,
    actors: Vec<Actor>,
    shelves: Vec<Shelf>,
    books: Vec<Book>,
    deleted_books: Vec<Book>,
    blocks: Vec<Block>,
    tags: Vec<Tag>,
    links: Vec<Link>,
}

impl Library {
    fn book(&self, id: Uuid) -> Option<&Book> {
        self.books.iter().find(|b| b.id == id)
    }

    fn book_title(&self, id: Uuid) -> Option<String> {
        self.book(id).map(|b| b.title.clone())
    }

    fn shelf_name(&self, id: Uuid) -> Option<String> {
        self.shelves.iter().find(|s| s.id == id).map(|s| s.name.clone())
    }

    /// Forgets a book and what hangs on it (when deleted, or to stay within the caps).
    fn drop_book(&mut self, i: usize) -> Book {
        let book = self.books.swap_remove(i);
        self.blocks.retain(|b| b.book_id != book.id);
        self.links.retain(|l| l.book_id != book.id);
        book
    }
}

/// How much each library remembers, so memory stays bounded for any --count.
#[derive(Debug, Clone, Copy)]
struct Caps {
    blocks: usize,
    books: usize,
    shelves: usize,
    tags: usize,
    links: usize,
    deleted_books: usize,
}

impl Caps {
    fn for_libraries(libraries: u64) -> Caps {
        let blocks = (1_000_000 / libraries as usize).clamp(100, 5_000);
        Caps { blocks, books: (blocks / 10).max(20), shelves: 24, tags: 40, links: blocks, deleted_books: 30 }
    }
}

/// What one event says, before the context (who, when, from where) is added.
struct Draft {
    entity_type: &'static str,
    entity_id: Uuid,
    event_type: EventType,
    before: Option<Value>,
    after: Option<Value>,
    diff: Option<Value>,
    reason: Option<String>,
}

/// Produces `count` events for a seed; an iterator, so any count streams in constant
/// memory (beyond the bounded library state).
pub struct Generator {
    rng: Rng,
    libraries: Vec<Library>,
    /// Cumulative weights of the libraries: library i is drawn with weight 1/(i+1).
    cumulative: Vec<u64>,
    caps: Caps,
    count: u64,
    produced: u64,
    start_us: i64,
    last_request: Option<(usize, Option<Uuid>, String)>,
}

impl Generator {
    pub fn new(seed: u64, libraries: u64, count: u64) -> Generator {
        let libraries = libraries.max(1);
        let mut rng = Rng(seed);
        let end = WINDOW_END_UNIX - (rng.below(180) as i64) * 86_400;
        let start_us = end * 1_000_000 - WINDOW_US;
        let caps = Caps::for_libraries(libraries);
        let mut total = 0;
        let cumulative = (0..libraries)
            .map(|i| {
                total += 1_000_000 / (i + 1);
                total
            })
            .collect();
        let libraries = (0..libraries)
            .map(|_| {
                let actors = (0..1 + rng.below(5)).map(|_| new_actor(&mut rng)).collect();
                Library { actors, ..Library::default() }
            })
            .collect();
        Generator { rng, libraries, cumulative, caps, count, produced: 0, start_us, last_request: None }
    }

    /// How many libraries have received events so far.
    pub fn libraries_started(&self) -> u64 {
        self.libraries.iter().filter(|l| l.started).count() as u64
    }

    /// The business time of event `i`: evenly spread over the window, jittered within
    /// its slot, and now and then a few minutes early (a client with a skewed clock).
    fn occurred_at_us(&mut self, i: u64) -> i64 {
        let slot = (i128::from(WINDOW_US) * i128::from(i) / i128::from(self.count)) as i64;
        let gap = (WINDOW_US / self.count.max(1) as i64).max(1);
        let mut t = self.start_us + slot + self.rng.below(gap as u64) as i64;
        if self.rng.chance(20) {
            t -= self.rng.below(600_000_000) as i64;
        }
        t.max(self.start_us)
    }

    fn draw_library(&mut self) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(1);
        let r = self.rng.below(total);
        self.cumulative.partition_point(|&c| c <= r).min(self.libraries.len() - 1)
    }

    fn draw_type(&mut self) -> EventType {
        let total: u64 = TYPE_WEIGHTS.iter().map(|(_, w)| w).sum();
        let mut r = self.rng.below(total);
        for &(name, w) in TYPE_WEIGHTS {
            if r < w {
                return name;
            }
            r -= w;
        }
        EventType::BlockUpdated
    }

    /// The next event: a library, a type that fits its state, then the context.
    fn next_event(&mut self) -> NewEvent {
        let i = self.produced;
        self.produced += 1;
        let occurred_us = self.occurred_at_us(i);
        let lib_index = self.draw_library();
        let ms = (occurred_us / 1_000) as u64;

        let draft = if self.libraries[lib_index].started {
            let mut event_type = self.draw_type();
            loop {
                match self.draft(lib_index, event_type, ms) {
                    Some(d) => break d,
                    None => event_type = fallback(event_type),
                }
            }
        } else {
            self.create_library(lib_index, ms)
        };

        let system = self.rng.chance(30);
        let lib = &self.libraries[lib_index];
        let actor = if system {
            None
        } else if self.rng.chance(500) {
            Some(lib.actors[0].clone())
        } else {
            Some(self.rng.pick(&lib.actors).clone())
        };
        let (client, ip) = match &actor {
            None => (Some(self.rng.pick(SYSTEM_CLIENTS).to_string()), None),
            Some(_) if self.rng.chance(100) => {
                (Some(self.rng.pick(CLIENTS).to_string()), Some(random_ip(&mut self.rng)))
            }
            Some(a) => (Some(a.client.to_string()), Some(a.ip)),
        };
        let actor_id = actor.map(|a| a.id);
        let request_id = self.request_id(lib_index, actor_id, system);
        let reason = draft.reason.or_else(|| {
            if system && self.rng.chance(500) {
                Some(self.rng.pick(SYSTEM_REASONS).to_string())
            } else {
                None
            }
        });
        let created_us = occurred_us + self.write_delay_us();
        let lib = &self.libraries[lib_index];
        NewEvent {
            id: Some(self.rng.uuid_v7(ms)),
            library_id: lib.id,
            actor_user_id: actor_id,
            entity_type: draft.entity_type.to_string(),
            entity_id: draft.entity_id,
            event_type: draft.event_type.as_str().to_string(),
            before: draft.before,
            after: draft.after,
            diff: draft.diff,
            occurred_at: time_of(occurred_us),
            created_at: Some(time_of(created_us)),
            request_id,
            client,
            reason,
            ip,
        }
    }

    /// A request id like an API gateway's; consecutive events of one actor sometimes
    /// share one (one request, several changes); a few have none.
    fn request_id(&mut self, lib: usize, actor: Option<Uuid>, system: bool) -> Option<String> {
        if let Some((l, a, id)) = &self.last_request {
            if *l == lib && *a == actor && self.rng.chance(120) {
                return Some(id.clone());
            }
        }
        if self.rng.chance(40) {
            return None;
        }
        let id = if system {
            format!("job-{:012x}", self.rng.next_u64() >> 16)
        } else {
            format!("req_{:016x}", self.rng.next_u64())
        };
        self.last_request = Some((lib, actor, id.clone()));
        Some(id)
    }

    /// Write time after business time: usually milliseconds, sometimes seconds, and
    /// now and then hours (an offline mobile client syncing).
    fn write_delay_us(&mut self) -> i64 {
        let r = self.rng.below(1000);
        let us = if r < 850 {
            5_000 + self.rng.below(800_000)
        } else if r < 970 {
            1_000_000 + self.rng.below(29_000_000)
        } else {
            60_000_000 + self.rng.below(6 * 3_600_000_000)
        };
        us as i64
    }

    fn create_library(&mut self, li: usize, ms: u64) -> Draft {
        let id = self.rng.uuid_v7(ms);
        let name = self.rng.pick(LIBRARY_NAMES).to_string();
        let lib = &mut self.libraries[li];
        lib.id = id;
        lib.name = name.clone();
        lib.started = true;
        Draft {
            entity_type: "library",
            entity_id: id,
            event_type: EventType::LibraryCreated,
            before: None,
            after: Some(json!({"name": name})),
            diff: None,
            reason: None,
        }
    }

    /// An event of `event_type` in library `li`, or `None` when the library has nothing
    /// it could be about (then a fallback type is tried).
    fn draft(&mut self, li: usize, event_type: EventType, ms: u64) -> Option<Draft> {
        let caps = self.caps;
        let rng = &mut self.rng;
        let lib = &mut self.libraries[li];
        let reason = |rng: &mut Rng, per_mille: u64, pool: &[&str]| {
            if rng.chance(per_mille) {
                Some(rng.pick(pool).to_string())
            } else {
                None
            }
        };
        let d = |entity_type, entity_id, before, after| Draft {
            entity_type,
            entity_id,
            event_type,
            before,
            after,
            diff: None,
            reason: None,
        };
        let draft = match event_type {
            EventType::LibraryRenamed => {
                let old = lib.name.clone();
                lib.name = different(rng, LIBRARY_NAMES, &old);
                Draft {
                    reason: reason(rng, 100, RENAME_REASONS),
                    ..d("library", lib.id, Some(json!({"name": old})), Some(json!({"name": lib.name})))
                }
            }
            EventType::BookshelfCreated => {
                if lib.shelves.len() >= caps.shelves {
                    return None;
                }
                let shelf = Shelf { id: rng.uuid_v7(ms), name: rng.pick(SHELF_NAMES).to_string() };
                let draft = d("bookshelf", shelf.id, None, Some(json!({"name": shelf.name})));
                lib.shelves.push(shelf);
                draft
            }
            EventType::BookshelfRenamed => {
                if lib.shelves.is_empty() {
                    return None;
                }
                let i = rng.index(lib.shelves.len());
                let old = lib.shelves[i].name.clone();
                lib.shelves[i].name = different(rng, SHELF_NAMES, &old);
                Draft {
                    reason: reason(rng, 100, RENAME_REASONS),
                    ..d(
                        "bookshelf",
                        lib.shelves[i].id,
                        Some(json!({"name": old})),
                        Some(json!({"name": lib.shelves[i].name})),
                    )
                }
            }
            EventType::BookshelfDeleted => {
                // Only an empty bookshelf, and never the last one.
                let empty: Vec<usize> = (0..lib.shelves.len())
                    .filter(|&i| !lib.books.iter().any(|b| b.shelf_id == lib.shelves[i].id))
                    .collect();
                if lib.shelves.len() < 2 || empty.is_empty() {
                    return None;
                }
                let shelf = lib.shelves.swap_remove(*rng.pick(&empty));
                Draft {
                    reason: reason(rng, 350, DELETE_REASONS),
                    ..d("bookshelf", shelf.id, Some(json!({"name": shelf.name})), None)
                }
            }
            EventType::BookCreated => {
                if lib.shelves.is_empty() {
                    return None;
                }
                if lib.books.len() >= caps.books {
                    let i = rng.index(lib.books.len());
                    lib.drop_book(i);
                }
                let shelf = rng.pick(&lib.shelves).clone();
                let book = Book { id: rng.uuid_v7(ms), title: book_title(rng), shelf_id: shelf.id, blocks: 0 };
                let after =
                    json!({"title": book.title, "bookshelf_id": shelf.id.to_string(), "bookshelf_name": shelf.name});
                let draft = d("book", book.id, None, Some(after));
                lib.books.push(book);
                draft
            }
            EventType::BookRenamed => {
                if lib.books.is_empty() {
                    return None;
                }
                let i = rng.index(lib.books.len());
                let old = lib.books[i].title.clone();
                let mut new = book_title(rng);
                if new == old {
                    new = format!("{old} (2)");
                }
                lib.books[i].title = new.clone();
                Draft {
                    reason: reason(rng, 100, RENAME_REASONS),
                    ..d("book", lib.books[i].id, Some(json!({"title": old})), Some(json!({"title": new})))
                }
            }
            EventType::BookMoved => {
                if lib.books.is_empty() || lib.shelves.len() < 2 {
                    return None;
                }
                let i = rng.index(lib.books.len());
                let from = lib.books[i].shelf_id;
                let others: Vec<&Shelf> = lib.shelves.iter().filter(|s| s.id != from).collect();
                let to = (*rng.pick(&others)).clone();
                let from_name = lib.shelf_name(from);
                let book = &mut lib.books[i];
                book.shelf_id = to.id;
                let mut before = json!({"bookshelf_id": from.to_string(), "title": book.title});
                if let Some(n) = from_name {
                    before["bookshelf_name"] = json!(n);
                }
                let after = json!({"bookshelf_id": to.id.to_string(), "bookshelf_name": to.name, "title": book.title});
                Draft { reason: reason(rng, 200, MOVE_REASONS), ..d("book", book.id, Some(before), Some(after)) }
            }
            EventType::BookDeleted => {
                if lib.books.is_empty() {
                    return None;
                }
                let i = rng.index(lib.books.len());
                let book = lib.drop_book(i);
                let before = json!({"title": book.title, "bookshelf_id": book.shelf_id.to_string()});
                let draft =
                    Draft { reason: reason(rng, 350, DELETE_REASONS), ..d("book", book.id, Some(before), None) };
                if lib.deleted_books.len() >= caps.deleted_books {
                    lib.deleted_books.swap_remove(0);
                }
                lib.deleted_books.push(book);
                draft
            }
            EventType::BookRestored => {
                if lib.deleted_books.is_empty() || lib.shelves.is_empty() {
                    return None;
                }
                let mut book = lib.deleted_books.swap_remove(rng.index(lib.deleted_books.len()));
                if lib.shelf_name(book.shelf_id).is_none() {
                    book.shelf_id = rng.pick(&lib.shelves).id;
                }
                book.blocks = 0;
                let after = json!({
                    "title": book.title,
                    "bookshelf_id": book.shelf_id.to_string(),
                    "bookshelf_name": lib.shelf_name(book.shelf_id),
                });
                let draft =
                    Draft { reason: reason(rng, 500, RESTORE_REASONS), ..d("book", book.id, None, Some(after)) };
                if lib.books.len() >= caps.books {
                    let i = rng.index(lib.books.len());
                    lib.drop_book(i);
                }
                lib.books.push(book);
                draft
            }
            EventType::BlockCreated => {
                if lib.books.is_empty() {
                    return None;
                }
                if lib.blocks.len() >= caps.blocks {
                    lib.blocks.swap_remove(rng.index(lib.blocks.len()));
                }
                let bi = rng.index(lib.books.len());
                let kind = *rng.pick(BLOCK_KINDS);
                let text = block_text(rng, kind);
                let book = &mut lib.books[bi];
                let position = if book.blocks > 0 && rng.chance(200) {
                    rng.below(u64::from(book.blocks)) as u32
                } else {
                    book.blocks
                };
                book.blocks += 1;
                let block = Block { id: rng.uuid_v7(ms), book_id: book.id, kind, text, position };
                let after = json!({
                    "book_id": book.id.to_string(), "kind": kind, "text": block.text,
                    "position": position, "book_title": book.title,
                });
                let draft = d("block", block.id, None, Some(after));
                lib.blocks.push(block);
                draft
            }
            EventType::BlockUpdated => {
                if lib.blocks.is_empty() {
                    return None;
                }
                let i = rng.index(lib.blocks.len());
                let old = lib.blocks[i].text.clone();
                let new = edited_text(rng, lib.blocks[i].kind, &old);
                lib.blocks[i].text = new.clone();
                let title = lib.book_title(lib.blocks[i].book_id);
                let (old_chars, new_chars) = (old.chars().count(), new.chars().count());
                Draft {
                    diff: Some(json!({"text": {"chars_before": old_chars, "chars_after": new_chars}})),
                    ..d(
                        "block",
                        lib.blocks[i].id,
                        Some(json!({"text": old, "book_title": title})),
                        Some(json!({"text": new, "book_title": title})),
                    )
                }
            }
            EventType::BlockMoved => {
                if lib.blocks.is_empty() {
                    return None;
                }
                let i = rng.index(lib.blocks.len());
                let (book_id, old) = (lib.blocks[i].book_id, lib.blocks[i].position);
                let size = lib.book(book_id).map_or(2, |b| b.blocks.max(2));
                let mut new = rng.below(u64::from(size)) as u32;
                if new == old {
                    new = if old == 0 { 1 } else { old - 1 };
                }
                lib.blocks[i].position = new;
                let title = lib.book_title(book_id);
                d(
                    "block",
                    lib.blocks[i].id,
                    Some(json!({"position": old, "book_title": title})),
                    Some(json!({"position": new, "book_title": title})),
                )
            }
            EventType::BlockDeleted => {
                if lib.blocks.is_empty() {
                    return None;
                }
                let block = lib.blocks.swap_remove(rng.index(lib.blocks.len()));
                lib.links.retain(|l| l.entity_id != block.id);
                let title = lib.book_title(block.book_id);
                let before = json!({"text": block.text, "kind": block.kind, "book_id": block.book_id.to_string(), "book_title": title});
                Draft { reason: reason(rng, 100, DELETE_REASONS), ..d("block", block.id, Some(before), None) }
            }
            EventType::TagCreated => {
                if lib.tags.len() >= caps.tags {
                    return None;
                }
                let mut name = rng.pick(TAG_NAMES).to_string();
                if lib.tags.iter().any(|t| t.name == name) {
                    name = format!("{name}-{}", lib.tags.len() + 1);
                }
                let tag = Tag { id: rng.uuid_v7(ms), name };
                let draft = d("tag", tag.id, None, Some(json!({"name": tag.name})));
                lib.tags.push(tag);
                draft
            }
            EventType::TagRenamed => {
                if lib.tags.is_empty() {
                    return None;
                }
                let i = rng.index(lib.tags.len());
                let old = lib.tags[i].name.clone();
                lib.tags[i].name = different(rng, TAG_NAMES, &old);
                d("tag", lib.tags[i].id, Some(json!({"name": old})), Some(json!({"name": lib.tags[i].name})))
            }
            EventType::TagDeleted => {
                if lib.tags.is_empty() {
                    return None;
                }
                let tag = lib.tags.swap_remove(rng.index(lib.tags.len()));
                lib.links.retain(|l| l.tag_id != tag.id);
                Draft {
                    reason: reason(rng, 200, DELETE_REASONS),
                    ..d("tag", tag.id, Some(json!({"name": tag.name})), None)
                }
            }
            EventType::TagAdded => {
                if lib.tags.is_empty() || lib.books.is_empty() {
                    return None;
                }
                let tag = rng.pick(&lib.tags).clone();
                let (entity_type, entity_id, book_id) = if !lib.blocks.is_empty() && rng.chance(500) {
                    let b = rng.pick(&lib.blocks);
                    ("block", b.id, b.book_id)
                } else {
                    let b = rng.pick(&lib.books);
                    ("book", b.id, b.id)
                };
                if lib.links.iter().any(|l| l.tag_id == tag.id && l.entity_id == entity_id) {
                    return None;
                }
                if lib.links.len() >= caps.links {
                    lib.links.swap_remove(rng.index(lib.links.len()));
                }
                lib.links.push(Link { tag_id: tag.id, entity_type, entity_id, book_id });
                let after =
                    json!({"tag_id": tag.id.to_string(), "tag_name": tag.name, "book_title": lib.book_title(book_id)});
                d(entity_type, entity_id, None, Some(after))
            }
            EventType::TagRemoved => {
                if lib.links.is_empty() {
                    return None;
                }
                let link = lib.links.swap_remove(rng.index(lib.links.len()));
                let name = lib.tags.iter().find(|t| t.id == link.tag_id).map(|t| t.name.clone()).unwrap_or_default();
                let before = json!({"tag_id": link.tag_id.to_string(), "tag_name": name, "book_title": lib.book_title(link.book_id)});
                d(link.entity_type, link.entity_id, Some(before), None)
            }
            // Not drawn: a library's first event (`create_library`).
            EventType::LibraryCreated => return None,
        };
        Some(draft)
    }
}

impl Iterator for Generator {
    type Item = NewEvent;

    fn next(&mut self) -> Option<NewEvent> {
        if self.produced >= self.count {
            return None;
        }
        Some(self.next_event())
    }
}

fn time_of(us: i64) -> DateTime<Utc> {
    Utc.timestamp_micros(us).single().unwrap_or_default()
}

fn new_actor(rng: &mut Rng) -> Actor {
    Actor { id: rng.uuid_v4(), client: CLIENTS[rng.index(CLIENTS.len())], ip: random_ip(rng) }
}

/// An address from the ranges reserved for documentation (RFC 5737, RFC 3849): looks
/// real, belongs to no one.
fn random_ip(rng: &mut Rng) -> IpAddr {
    if rng.chance(800) {
        let prefix = *rng.pick(&[[192u8, 0, 2], [198, 51, 100], [203, 0, 113]]);
        IpAddr::V4(Ipv4Addr::new(prefix[0], prefix[1], prefix[2], 1 + rng.below(254) as u8))
    } else {
        let r = rng.next_u64();
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, (r >> 48) as u16, (r >> 32) as u16, 0, 0, (r >> 16) as u16, r as u16))
    }
}

/// A pick from `pool` that differs from `old` (a rename always renames).
fn different(rng: &mut Rng, pool: &[&str], old: &str) -> String {
    for _ in 0..4 {
        let name = *rng.pick(pool);
        if name != old {
            return name.to_string();
        }
    }
    format!("{old} (new)")
}

fn book_title(rng: &mut Rng) -> String {
    let base = if rng.chance(450) { *rng.pick(BOOK_TITLES_ZH) } else { *rng.pick(BOOK_TITLES_EN) };
    match rng.below(10) {
        0 => format!("{base} {}", 2020 + rng.below(6)),
        1 => format!("{base} (draft)"),
        2 => format!("{base}（{}）", rng.pick(&["上", "下", "二", "续"])),
        _ => base.to_string(),
    }
}

fn block_text(rng: &mut Rng, kind: &str) -> String {
    match kind {
        "code" => rng.pick(CODE_SNIPPETS).to_string(),
        "heading" => rng.pick(HEADINGS).to_string(),
        "todo" => rng.pick(TODOS).to_string(),
        _ if rng.chance(400) => rng.pick(SENTENCES_ZH).to_string(),
        _ => rng.pick(SENTENCES_EN).to_string(),
    }
}

/// An edit of a block's text: usually a sentence added, sometimes a rewrite.
fn edited_text(rng: &mut Rng, kind: &str, old: &str) -> String {
    let new = if kind == "paragraph" && old.chars().count() < 300 && rng.chance(700) {
        let more = block_text(rng, kind);
        let sep = if old.is_ascii() && more.is_ascii() { " " } else { "" };
        format!("{old}{sep}{more}")
    } else {
        block_text(rng, kind)
    };
    if new == old {
        format!("{old} ✓")
    } else {
        new
    }
}

const LIBRARY_NAMES: &[&str] = &[
    "Alice's Notes",
    "Team Wiki",
    "Family",
    "Side Projects",
    "Study Group",
    "Research",
    "Kitchen",
    "我的笔记",
    "研发团队知识库",
    "读书会",
    "家庭相册说明",
    "个人知识库",
];
const SHELF_NAMES: &[&str] = &[
    "Work",
    "Personal",
    "Reading",
    "Recipes",
    "Travel",
    "Archive",
    "Ideas",
    "Projects",
    "Learning",
    "Inbox",
    "工作",
    "生活",
    "读书",
    "学习资料",
    "旅行",
    "归档",
    "灵感",
    "项目",
    "收件箱",
];
const BOOK_TITLES_EN: &[&str] = &[
    "Distributed Systems Notes",
    "Rust Ownership Deep Dive",
    "Reading List",
    "Kyoto Travel Plan",
    "Weekly Meal Prep",
    "Garden Journal",
    "Interview Questions",
    "Book Club: Dune",
    "Product Roadmap Q3",
    "Meeting Notes",
    "Sourdough Experiments",
    "Marathon Training Log",
    "Postgres Internals",
    "Home Renovation",
    "Birthday Ideas",
    "Research: Sleep and Memory",
    "Learning Japanese",
    "Budget",
    "Design Review Checklist",
    "Poems I Like",
    "On-call Runbook",
    "Thesis Outline",
];
const BOOK_TITLES_ZH: &[&str] = &[
    "三体读书笔记",
    "红楼梦人物关系",
    "机器学习入门",
    "周末菜谱",
    "京都旅行计划",
    "年度读书清单",
    "产品需求文档",
    "会议纪要",
    "健身计划",
    "英语单词本",
    "数据库原理",
    "家庭装修笔记",
    "育儿日记",
    "投资理财学习",
    "唐诗三百首摘抄",
    "项目复盘",
    "论文阅读：注意力机制",
    "摄影技巧",
    "咖啡品鉴记录",
    "日语学习笔记",
];
const BLOCK_KINDS: &[&str] = &[
    "paragraph",
    "paragraph",
    "paragraph",
    "paragraph",
    "paragraph",
    "paragraph",
    "heading",
    "todo",
    "todo",
    "quote",
    "list",
    "code",
];
const SENTENCES_EN: &[&str] = &[
    "The outbox keeps the write and its event in one transaction.",
    "Buy flour, yeast and salt before Saturday.",
    "Chapter three argues that memory consolidates during deep sleep.",
    "Ask Maria about the venue deposit.",
    "Indexes should follow the queries, not the other way round.",
    "Day 12: 8 km easy run, felt good.",
    "The hero's doubt in the second act is the real turning point.",
    "Keep the lease shorter than the slowest batch, but not by much.",
    "Temple visits in the morning, Nishiki market after lunch.",
    "Proof at 24°C for about four hours; the dough should jiggle.",
    "Open question: do we need per-library rate limits?",
    "\"The map is not the territory.\" — Korzybski",
    "Remember: tabs\tand back\\slashes survive the round trip.",
];
const SENTENCES_ZH: &[&str] = &[
    "今天读完了第三章，作者对黑暗森林的解释很有说服力。",
    "明天上午十点和设计团队开会，讨论新版首页。",
    "记得周末给妈妈打电话。",
    "数据库索引的选择取决于查询模式。",
    "宝玉和黛玉的关系在这一回有了明显变化。",
    "面团发酵四个小时，表面出现气泡就可以了。",
    "注意力机制的核心是对输入加权求和。",
    "本周跑量三十公里，下周增加到三十五公里。",
    "岚山的竹林要早上去，人少一些。",
];
const HEADINGS: &[&str] =
    &["Overview", "Next steps", "Open questions", "References", "概述", "下一步", "参考资料", "待解决的问题"];
const TODOS: &[&str] = &[
    "[ ] book the ryokan",
    "[x] renew passport",
    "[ ] review PR #42",
    "[ ] 买菜",
    "[x] 提交报销",
    "[ ] write the retro notes",
];
const CODE_SNIPPETS: &[&str] = &[
    "SELECT id, summary FROM chronicle_entries\nWHERE library_id = $1\nORDER BY occurred_at DESC, id DESC\nLIMIT 50;",
    "fn main() {\n\tprintln!(\"hello\\n\");\n}",
    "git log --oneline | head -n 5",
    "for f in *.md; do wc -l \"$f\"; done",
];
const TAG_NAMES: &[&str] = &[
    "todo",
    "important",
    "draft",
    "idea",
    "review",
    "reference",
    "rust",
    "postgres",
    "recipe",
    "travel",
    "待办",
    "重要",
    "灵感",
    "读书",
    "复习",
    "草稿",
    "工作",
    "家庭",
];
const CLIENTS: &[&str] =
    &["web/1.42.0", "web/1.42.0", "web/1.43.2", "ios/3.1", "ios/3.2.0", "android/2.8.1", "desktop/0.9.4", "api/1.0"];
const SYSTEM_CLIENTS: &[&str] = &["system/importer", "system/cleanup", "system/migration"];
const SYSTEM_REASONS: &[&str] = &["scheduled cleanup", "import from Evernote", "data migration v2", "定期清理"];
const RENAME_REASONS: &[&str] = &["typo", "clearer name", "改个更好的名字"];
const DELETE_REASONS: &[&str] =
    &["cleanup", "duplicate", "no longer needed", "merged into another book", "整理", "重复内容", "过期资料"];
const MOVE_REASONS: &[&str] = &["reorganizing shelves", "project finished", "整理书架"];
const RESTORE_REASONS: &[&str] = &["deleted by mistake", "needed again", "误删恢复"];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::{event_from_json, event_to_json, Rules};
    use std::collections::BTreeSet;

    #[test]
    fn the_same_seed_gives_the_same_events_and_another_seed_others() {
        let a: Vec<NewEvent> = Generator::new(7, 3, 500).collect();
        let b: Vec<NewEvent> = Generator::new(7, 3, 500).collect();
        let c: Vec<NewEvent> = Generator::new(8, 3, 500).collect();
        assert_eq!(a.len(), 500);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn every_event_is_valid_and_every_type_appears() {
        let mut types = BTreeSet::new();
        let mut ids = BTreeSet::new();
        let mut libraries = BTreeSet::new();
        let mut system = 0;
        for e in Generator::new(1, 3, 2000) {
            let back = event_from_json(&event_to_json(None, &e), Rules::default());
            assert_eq!(back.as_ref(), Ok(&e), "{}", event_to_json(None, &e));
            assert!(ids.insert(e.id), "repeated id");
            assert!(e.created_at.is_some_and(|c| c >= e.occurred_at));
            types.insert(e.event_type.clone());
            libraries.insert(e.library_id);
            system += usize::from(e.actor_user_id.is_none());
        }
        let all: BTreeSet<String> = EventType::ALL.iter().map(|t| t.to_string()).collect();
        assert_eq!(types, all);
        assert_eq!(libraries.len(), 3);
        assert!((20..=150).contains(&system), "{system} system events");
    }

    #[test]
    fn each_library_starts_with_its_creation_and_times_stay_in_the_window() {
        let events: Vec<NewEvent> = Generator::new(3, 5, 3000).collect();
        let mut seen = BTreeSet::new();
        for e in &events {
            if seen.insert(e.library_id) {
                assert_eq!(e.event_type, "LibraryCreated");
                assert_eq!(e.entity_id, e.library_id);
            }
        }
        let first = events.first().map(|e| e.occurred_at).unwrap_or_default();
        let last = events.last().map(|e| e.occurred_at).unwrap_or_default();
        assert!(last - first > chrono::Duration::days(85) && last - first <= chrono::Duration::days(91));
        let out_of_order = events.windows(2).filter(|w| w[1].occurred_at < w[0].occurred_at).count();
        assert!(out_of_order < events.len() / 10, "{out_of_order} out of order");
    }

    #[test]
    fn renames_start_from_the_previous_name() {
        let events: Vec<NewEvent> = Generator::new(1, 1, 3000).collect();
        let mut title = std::collections::HashMap::new();
        let mut checked = 0;
        for e in &events {
            match e.event_type.as_str() {
                "BookCreated" => {
                    title.insert(e.entity_id, e.after.as_ref().map(|a| a["title"].clone()));
                }
                "BookRenamed" => {
                    let before = e.before.as_ref().map(|b| b["title"].clone());
                    assert_eq!(title.get(&e.entity_id), Some(&before));
                    title.insert(e.entity_id, e.after.as_ref().map(|a| a["title"].clone()));
                    checked += 1;
                }
                _ => {}
            }
        }
        assert!(checked > 10);
    }

    #[test]
    fn one_event_touches_one_library() {
        let g = Generator::new(1, 3, 1);
        let events: Vec<NewEvent> = g.collect();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].event_type, "LibraryCreated");
        let mut g = Generator::new(1, 50, 10);
        g.by_ref().for_each(drop);
        assert!(g.libraries_started() <= 10);
    }
}
