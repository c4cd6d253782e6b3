//! Cursor pagination, the same on every list route: `?limit=N&cursor=C`
//! in, `{"results": [...], "next": C | null}` out. A list is read in one
//! stable order (each route documents it, with a unique key last so no two
//! rows tie), and a cursor is the key of the last row a page returned,
//! opaque to clients: base64url of its JSON. The next page is the rows
//! after that key, so rows added or removed meanwhile shift nothing.
//!
//! A new list route takes a [`PageQuery`], reads `request.fetch()` rows
//! after `request.after` (in SQL, or from a short list with
//! [`Page::from_sorted`]), and answers [`Page::new`]:
//!
//! ```ignore
//! async fn list_keys(ApiQuery(page): ApiQuery<PageQuery>, ..) -> Result<Json<Page<Key>>, ApiError> {
//!     let request = page.request::<String>(100)?;
//!     let rows = store.keys_after(org, request.after.as_deref(), request.fetch()).await?;
//!     Ok(Json(Page::new(rows, &request, |key| key.id.clone())))
//! }
//! ```

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::ApiError;

/// Most rows one page may hold, on every list.
pub const MAX_LIMIT: u32 = 1000;

/// The paging parameters of a list route.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Most results in the page, from 1 to 1000; 100 when left out.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    pub limit: Option<String>,
    /// The `next` of the previous page, unchanged; left out for the first
    /// page.
    pub cursor: Option<String>,
}

/// A page to read: how many rows, after which key.
#[derive(Debug)]
pub struct PageRequest<K> {
    pub limit: u32,
    /// The key of the last row of the previous page.
    pub after: Option<K>,
}

impl PageQuery {
    /// Checks the parameters, naming the one at fault.
    pub fn request<K: DeserializeOwned>(
        &self,
        default_limit: u32,
    ) -> Result<PageRequest<K>, ApiError> {
        let limit = match &self.limit {
            Some(text) => text
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=MAX_LIMIT).contains(n))
                .ok_or_else(|| {
                    ApiError::field(
                        "limit",
                        format!("`limit` must be a number from 1 to {MAX_LIMIT}, got {text}"),
                    )
                })?,
            None => default_limit,
        };
        let after = self.cursor.as_deref().map(decode).transpose()?;
        Ok(PageRequest { limit, after })
    }
}

impl<K> PageRequest<K> {
    /// Rows to read: one past the page, to learn whether another follows.
    pub fn fetch(&self) -> u32 {
        self.limit + 1
    }
}

fn decode<K: DeserializeOwned>(cursor: &str) -> Result<K, ApiError> {
    URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|json| serde_json::from_slice(&json).ok())
        .ok_or_else(|| ApiError::Validation {
            code: "invalid_cursor",
            attr: Some("cursor".into()),
            detail: "`cursor` is not one this list gave: pass the `next` of the previous page unchanged, or leave `cursor` out for the first page".into(),
        })
}

fn encode<K: Serialize>(key: &K) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(key).expect("a page key serialises"))
}

/// One page of a list.
#[derive(Debug, Serialize, ToSchema)]
pub struct Page<T> {
    pub results: Vec<T>,
    /// The `cursor` of the next page; null on the last page.
    #[schema(required = true)]
    pub next: Option<String>,
}

impl<T> Page<T> {
    /// The page of `rows`, read in the list's order with
    /// [`PageRequest::fetch`]; `key` gives a row's position in that order.
    pub fn new<K, P: Serialize>(
        mut rows: Vec<T>,
        request: &PageRequest<K>,
        key: impl Fn(&T) -> P,
    ) -> Page<T> {
        let more = rows.len() > request.limit as usize;
        rows.truncate(request.limit as usize);
        let next = more
            .then(|| rows.last().map(|row| encode(&key(row))))
            .flatten();
        Page {
            results: rows,
            next,
        }
    }

    /// The page of a whole list that is short enough to read at once (a
    /// project's plugin configs), sorted by `key`.
    pub fn from_sorted<K: Ord + Serialize>(
        rows: Vec<T>,
        request: &PageRequest<K>,
        key: impl Fn(&T) -> K,
    ) -> Page<T> {
        let rows: Vec<T> = rows
            .into_iter()
            .filter(|row| request.after.as_ref().is_none_or(|after| key(row) > *after))
            .take(request.fetch() as usize)
            .collect();
        Page::new(rows, request, key)
    }

    /// The same page with each row changed by `f`.
    pub fn map<U>(self, f: impl FnMut(T) -> U) -> Page<U> {
        Page {
            results: self.results.into_iter().map(f).collect(),
            next: self.next,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(limit: Option<&str>, cursor: Option<&str>) -> PageQuery {
        PageQuery {
            limit: limit.map(str::to_string),
            cursor: cursor.map(str::to_string),
        }
    }

    #[test]
    fn pages_follow_each_other_without_gaps_or_repeats() {
        let rows: Vec<i64> = (1..=7).collect();
        let mut cursor = None;
        let mut seen = Vec::new();
        loop {
            let request = query(Some("3"), cursor.as_deref())
                .request::<i64>(100)
                .unwrap();
            let page = Page::from_sorted(rows.clone(), &request, |row| *row);
            seen.extend(page.results);
            match page.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        assert_eq!(seen, rows);
    }

    #[test]
    fn a_full_last_page_has_no_next() {
        let request = query(Some("2"), None).request::<i64>(100).unwrap();
        let page = Page::from_sorted(vec![1, 2], &request, |row| *row);
        assert_eq!(page.next, None);
    }

    #[test]
    fn a_bad_cursor_or_limit_names_its_parameter() {
        for (limit, cursor, attr) in [
            (None, Some("not a cursor"), "cursor"),
            (None, Some("bm90IGpzb24"), "cursor"),
            (Some("0"), None, "limit"),
            (Some("1001"), None, "limit"),
            (Some("ten"), None, "limit"),
        ] {
            match query(limit, cursor).request::<i64>(100) {
                Err(ApiError::Validation { attr: Some(a), .. }) => assert_eq!(a, attr),
                other => panic!("{limit:?} {cursor:?} gave {other:?}"),
            }
        }
    }
}
