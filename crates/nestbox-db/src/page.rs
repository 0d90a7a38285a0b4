//! Keyset pagination, the same on every paginated list, and a small builder for queries whose
//! shape depends on filters.
//!
//! Lists are ordered newest first by `(created_at DESC, id DESC)`. The id breaks ties between
//! rows created in the same microsecond, so a page boundary never skips or repeats a row. The
//! cursor is an opaque string encoding the `(created_at, id)` of the last row of the previous
//! page at full (microsecond) precision.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::engine::Arg;
use crate::error::DbError;

/// Largest page a caller can ask for; larger limits are clamped.
pub const MAX_PAGE_LIMIT: u32 = 1000;
/// Page size when the caller does not say.
pub const DEFAULT_PAGE_LIMIT: u32 = 50;

/// Which page of a list to return.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// Rows per page, clamped to `1..=MAX_PAGE_LIMIT`.
    pub limit: u32,
    /// `next_cursor` of the previous page; `None` for the first page.
    pub cursor: Option<String>,
}

impl Default for Page {
    fn default() -> Self {
        Page {
            limit: DEFAULT_PAGE_LIMIT,
            cursor: None,
        }
    }
}

impl Page {
    /// The first page with `limit` rows.
    pub fn first(limit: u32) -> Self {
        Page {
            limit,
            cursor: None,
        }
    }

    /// The page after the one that returned `cursor`.
    pub fn after(limit: u32, cursor: impl Into<String>) -> Self {
        Page {
            limit,
            cursor: Some(cursor.into()),
        }
    }

    pub(crate) fn effective_limit(&self) -> u32 {
        self.limit.clamp(1, MAX_PAGE_LIMIT)
    }

    pub(crate) fn decoded_cursor(&self) -> Result<Option<Cursor>, DbError> {
        self.cursor.as_deref().map(Cursor::decode).transpose()
    }
}

/// One page of a list.
#[derive(Debug, Clone, PartialEq)]
pub struct Paged<T> {
    /// The rows, newest first.
    pub items: Vec<T>,
    /// Pass to [`Page::after`] for the next page; `None` on the last page.
    pub next_cursor: Option<String>,
}

/// The position after which a page starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cursor {
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) id: Uuid,
}

const CURSOR_VERSION: &str = "v1";

impl Cursor {
    pub(crate) fn encode(&self) -> String {
        let micros = self.created_at.timestamp_micros();
        URL_SAFE_NO_PAD.encode(format!("{CURSOR_VERSION}:{micros}:{}", self.id.simple()))
    }

    pub(crate) fn decode(s: &str) -> Result<Cursor, DbError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|_| DbError::InvalidCursor)?;
        let text = String::from_utf8(bytes).map_err(|_| DbError::InvalidCursor)?;
        let mut parts = text.split(':');
        let (Some(CURSOR_VERSION), Some(micros), Some(id), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(DbError::InvalidCursor);
        };
        let micros: i64 = micros.parse().map_err(|_| DbError::InvalidCursor)?;
        let created_at = DateTime::from_timestamp_micros(micros).ok_or(DbError::InvalidCursor)?;
        let id = Uuid::try_parse(id).map_err(|_| DbError::InvalidCursor)?;
        Ok(Cursor { created_at, id })
    }
}

/// Turns `limit + 1` fetched rows into a page: the extra row only says that there is more.
pub(crate) fn finish_page<T>(
    mut rows: Vec<T>,
    limit: u32,
    key: impl Fn(&T) -> (DateTime<Utc>, Uuid),
) -> Paged<T> {
    let limit = limit as usize;
    let next_cursor = if rows.len() > limit {
        rows.truncate(limit);
        rows.last().map(|last| {
            let (created_at, id) = key(last);
            Cursor { created_at, id }.encode()
        })
    } else {
        None
    };
    Paged {
        items: rows,
        next_cursor,
    }
}

/// A query assembled from pieces, numbering `$N` placeholders as arguments are pushed.
#[derive(Debug, Default)]
pub(crate) struct Sql {
    pub(crate) text: String,
    pub(crate) args: Vec<Arg>,
}

impl Sql {
    pub(crate) fn new(text: &str) -> Self {
        Sql {
            text: text.to_owned(),
            args: Vec::new(),
        }
    }

    /// Appends literal SQL.
    pub(crate) fn push(&mut self, text: &str) -> &mut Self {
        self.text.push_str(text);
        self
    }

    /// Appends a placeholder bound to `arg`.
    pub(crate) fn bind(&mut self, arg: impl Into<Arg>) -> &mut Self {
        self.args.push(arg.into());
        let n = self.args.len();
        self.text.push('$');
        self.text.push_str(&n.to_string());
        self
    }

    /// Appends `(p1, p2, …)` bound to `items`. `items` must not be empty.
    pub(crate) fn bind_list<A: Into<Arg>>(
        &mut self,
        items: impl IntoIterator<Item = A>,
    ) -> &mut Self {
        self.push("(");
        for (i, item) in items.into_iter().enumerate() {
            if i > 0 {
                self.push(", ");
            }
            self.bind(item);
        }
        self.push(")")
    }

    /// Appends the keyset condition and order for a page over `alias.created_at, alias.id`:
    /// `[AND (created_at, id) < (…)] ORDER BY … LIMIT limit+1`.
    pub(crate) fn page(&mut self, alias: &str, page: &Page) -> Result<&mut Self, DbError> {
        if let Some(cursor) = page.decoded_cursor()? {
            self.push(&format!(" AND ({alias}.created_at, {alias}.id) < ("));
            self.bind(cursor.created_at)
                .push(", ")
                .bind(cursor.id)
                .push(")");
        }
        self.push(&format!(
            " ORDER BY {alias}.created_at DESC, {alias}.id DESC LIMIT "
        ));
        self.bind(i64::from(page.effective_limit()) + 1);
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trip() {
        let c = Cursor {
            created_at: crate::engine::now(),
            id: Uuid::new_v4(),
        };
        assert_eq!(Cursor::decode(&c.encode()).unwrap(), c);
    }

    #[test]
    fn garbage_cursor_is_rejected() {
        for bad in ["", "???", "djE6eDp5", &URL_SAFE_NO_PAD.encode("v2:1:abc")] {
            assert!(
                matches!(Cursor::decode(bad), Err(DbError::InvalidCursor)),
                "{bad}"
            );
        }
    }

    #[test]
    fn placeholders_are_numbered() {
        let mut sql = Sql::new("SELECT 1 WHERE a = ");
        sql.bind(1_i64).push(" AND b IN ").bind_list(["x", "y"]);
        assert_eq!(sql.text, "SELECT 1 WHERE a = $1 AND b IN ($2, $3)");
        assert_eq!(sql.args.len(), 3);
    }

    #[test]
    fn finish_page_sets_cursor_only_when_more() {
        let rows: Vec<(DateTime<Utc>, Uuid)> = (0..3)
            .map(|_| (crate::engine::now(), Uuid::new_v4()))
            .collect();
        let page = finish_page(rows.clone(), 2, |r| *r);
        assert_eq!(page.items.len(), 2);
        assert!(page.next_cursor.is_some());
        let page = finish_page(rows, 3, |r| *r);
        assert!(page.next_cursor.is_none());
    }
}
