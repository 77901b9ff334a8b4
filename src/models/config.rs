//! Reading diffusers-style `config.json` values: defaults for absent keys, diffusers' "int or per-block
//! list" convention, and errors naming the file and key. Values that select behaviour we do not implement
//! are refused. Keys a model does not know are ignored in diffusers' files (diffusers writes many
//! bookkeeping keys and keeps unknown ones), and refused by name in the files we write ourselves
//! ([`ConfigReader::refuse_unread`]): there a key nothing reads is a typo that would silently change the model.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde_json::Value;

pub struct ConfigReader<'a> {
    pub path: PathBuf,
    value: &'a Value,
    /// Every key looked up so far, present or not.
    read: RefCell<BTreeSet<String>>,
}

impl<'a> ConfigReader<'a> {
    pub fn new(path: &Path, value: &'a Value) -> ConfigReader<'a> {
        ConfigReader { path: path.to_path_buf(), value, read: RefCell::new(BTreeSet::new()) }
    }

    /// A key's value as stored (null included), recording the key as read.
    pub fn raw(&self, key: &str) -> Option<&'a Value> {
        self.read.borrow_mut().insert(key.to_string());
        self.value.get(key)
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.raw(key).filter(|v| !v.is_null())
    }

    /// Refuses keys that nothing has read, other than `also_known` (keys a caller reads elsewhere) and
    /// keys starting with `_` (`_class_name` and diffusers' other bookkeeping): call it after reading a file
    /// of our own.
    pub fn refuse_unread(&self, also_known: &[&str]) -> Result<()> {
        let read = self.read.borrow();
        let Some(object) = self.value.as_object() else { bail!("{}: expected a JSON object of settings", self.path.display()) };
        let unknown: Vec<String> = object
            .keys()
            .filter(|k| !k.starts_with('_') && !read.contains(k.as_str()) && !also_known.contains(&k.as_str()))
            .map(|k| format!("'{k}'"))
            .collect();
        if !unknown.is_empty() {
            let known: Vec<&str> = read.iter().map(String::as_str).chain(also_known.iter().copied()).collect();
            bail!("{}: unknown key(s) {} (the keys read here are: {})", self.path.display(), unknown.join(", "), known.join(", "));
        }
        Ok(())
    }

    fn bad<T>(&self, key: &str, expected: &str) -> Result<T> {
        bail!("{}: '{key}' must be {expected}, found {}", self.path.display(), self.value[key])
    }

    pub fn usize(&self, key: &str, default: usize) -> Result<usize> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => match v.as_u64() {
                Some(x) => Ok(x as usize),
                None => self.bad(key, "a non-negative integer"),
            },
        }
    }

    pub fn f64(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => match v.as_f64() {
                Some(x) => Ok(x),
                None => self.bad(key, "a number"),
            },
        }
    }

    pub fn bool(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => match v.as_bool() {
                Some(x) => Ok(x),
                None => self.bad(key, "true or false"),
            },
        }
    }

    pub fn string(&self, key: &str, default: &str) -> Result<String> {
        match self.get(key) {
            None => Ok(default.to_string()),
            Some(v) => match v.as_str() {
                Some(x) => Ok(x.to_string()),
                None => self.bad(key, "a string"),
            },
        }
    }

    pub fn strings(&self, key: &str, default: &[&str]) -> Result<Vec<String>> {
        match self.get(key) {
            None => Ok(default.iter().map(|s| s.to_string()).collect()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .map_or_else(|| self.bad(key, "a list of strings"), Ok),
            Some(_) => self.bad(key, "a list of strings"),
        }
    }

    pub fn usizes(&self, key: &str, default: &[usize]) -> Result<Vec<usize>> {
        match self.get(key) {
            None => Ok(default.to_vec()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_u64().map(|x| x as usize))
                .collect::<Option<Vec<_>>>()
                .map_or_else(|| self.bad(key, "a list of integers"), Ok),
            Some(_) => self.bad(key, "a list of integers"),
        }
    }

    /// diffusers' "an int for every block, or one per block" values. `None` when absent.
    pub fn per_block(&self, key: &str, blocks: usize) -> Result<Option<Vec<usize>>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) if v.is_u64() => Ok(Some(vec![v.as_u64().unwrap() as usize; blocks])),
            Some(Value::Array(_)) => {
                let list = self.usizes(key, &[])?;
                if list.len() != blocks {
                    bail!("{}: '{key}' has {} entries for {blocks} blocks", self.path.display(), list.len());
                }
                Ok(Some(list))
            }
            Some(_) => self.bad(key, "an integer or a list of integers, one per block"),
        }
    }

    /// Refuses a key whose value selects a feature we do not implement.
    pub fn require(&self, key: &str, supported: &[Value], what: &str) -> Result<()> {
        let v = self.raw(key).cloned().unwrap_or(Value::Null);
        if !supported.contains(&v) {
            bail!("{}: '{key}' = {v} is not supported ({what})", self.path.display());
        }
        Ok(())
    }
}
