//! In-memory storage for tests and simulation.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, PoisonError};

use super::{Storage, StorageError, Table, Visitor, Write};

/// Storage in memory: same semantics as SQLite (atomic batches, ordered lists),
/// nothing survives the process.
#[derive(Debug, Default)]
pub struct MemoryStorage {
    tables: Mutex<HashMap<Table, BTreeMap<String, Vec<u8>>>>,
}

impl MemoryStorage {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Storage for MemoryStorage {
    fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let tables = self.tables.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(tables.get(&table).and_then(|t| t.get(key)).cloned())
    }

    fn list(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        let tables = self.tables.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(tables
            .get(&table)
            .map(|t| t.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default())
    }

    fn scan(&self, table: Table, visit: &mut Visitor<'_>) -> Result<(), StorageError> {
        let tables = self.tables.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(t) = tables.get(&table) {
            for (k, v) in t {
                visit(k, v)?;
            }
        }
        Ok(())
    }

    fn scan_range(
        &self,
        table: Table,
        start: &str,
        end: &str,
        limit: usize,
        visit: &mut Visitor<'_>,
    ) -> Result<(), StorageError> {
        if start >= end {
            return Ok(());
        }
        let tables = self.tables.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(t) = tables.get(&table) {
            let range = (
                std::ops::Bound::Included(start),
                std::ops::Bound::Excluded(end),
            );
            for (k, v) in t.range::<str, _>(range).take(limit) {
                visit(k, v)?;
            }
        }
        Ok(())
    }

    fn apply(&self, batch: &[Write]) -> Result<(), StorageError> {
        let mut tables = self.tables.lock().unwrap_or_else(PoisonError::into_inner);
        // Stage the batch in order on an overlay; commit only if all of it holds.
        let mut overlay: HashMap<(Table, &str), Option<&Vec<u8>>> = HashMap::new();
        for w in batch {
            match w {
                Write::Put { table, key, body } => {
                    overlay.insert((*table, key), Some(body));
                }
                Write::Insert { table, key, body } => {
                    let present = match overlay.get(&(*table, key.as_str())) {
                        Some(staged) => staged.is_some(),
                        None => tables.get(table).is_some_and(|t| t.contains_key(key)),
                    };
                    if present {
                        return Err(StorageError::AlreadyExists {
                            table: *table,
                            key: key.clone(),
                        });
                    }
                    overlay.insert((*table, key), Some(body));
                }
                Write::Delete { table, key } => {
                    overlay.insert((*table, key), None);
                }
            }
        }
        for ((table, key), body) in overlay {
            let t = tables.entry(table).or_default();
            match body {
                Some(b) => {
                    t.insert(key.to_owned(), b.clone());
                }
                None => {
                    t.remove(key);
                }
            }
        }
        Ok(())
    }
}
