//! In-memory storage for tests and simulation.

use std::collections::btree_map::Entry;
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
        // Apply in order, remembering what each write replaced; on a
        // conflict, undo in reverse so nothing of the batch remains.
        let mut undo: Vec<(usize, Option<Vec<u8>>)> = Vec::with_capacity(batch.len());
        let mut conflict = None;
        for (i, w) in batch.iter().enumerate() {
            match w {
                Write::Put { table, key, body } => {
                    let old = tables
                        .entry(*table)
                        .or_default()
                        .insert(key.clone(), body.clone());
                    undo.push((i, old));
                }
                Write::Insert { table, key, body } => {
                    // One descent of the tree for the check and the insert.
                    match tables.entry(*table).or_default().entry(key.clone()) {
                        Entry::Occupied(_) => {
                            conflict = Some(StorageError::AlreadyExists {
                                table: *table,
                                key: key.clone(),
                            });
                            break;
                        }
                        Entry::Vacant(slot) => {
                            slot.insert(body.clone());
                        }
                    }
                    undo.push((i, None));
                }
                Write::Delete { table, key } => {
                    let old = tables.get_mut(table).and_then(|t| t.remove(key));
                    undo.push((i, old));
                }
                Write::Require { table, key } => {
                    if !tables.get(table).is_some_and(|t| t.contains_key(key)) {
                        conflict = Some(StorageError::Missing {
                            table: *table,
                            key: key.clone(),
                        });
                        break;
                    }
                }
            }
        }
        let Some(conflict) = conflict else {
            return Ok(());
        };
        for (i, old) in undo.into_iter().rev() {
            let (table, key) = batch[i].target();
            let t = tables.entry(table).or_default();
            match old {
                Some(body) => {
                    t.insert(key.to_owned(), body);
                }
                None => {
                    t.remove(key);
                }
            }
        }
        Err(conflict)
    }
}
