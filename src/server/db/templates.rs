//! Provisioning templates as rows: the Templates page keeps them, the Add dialog picks one,
//! and the chosen text is copied onto the device (a later edit of the template does not change
//! what a device was promised).

use super::{now, Db};
use anyhow::{ensure, Result};
use rusqlite::{params, OptionalExtension};
use serde::Serialize;

/// A stored template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Template {
    /// Its name.
    pub name: String,
    /// Its text.
    pub body: String,
    /// Last change (Unix seconds).
    pub updated_at: i64,
}

impl Db {
    /// Saves a template (a new one, or new text for an existing name).
    pub fn save_template(&self, name: &str, body: &str) -> Result<()> {
        super::check_group_name(name).map_err(|_| {
            anyhow::anyhow!("{name:?} is not a template name (1 to 64 printable characters)")
        })?;
        ensure!(
            body.len() <= crate::protocol::MAX_TEMPLATE,
            "the template is {} bytes; at most {} fit in one delivery",
            body.len(),
            crate::protocol::MAX_TEMPLATE
        );
        ensure!(!body.trim().is_empty(), "the template is empty");
        self.with(|c| {
            c.execute(
                "INSERT INTO templates (name, body, created_at, updated_at) VALUES (?1, ?2, ?3, ?3)
                 ON CONFLICT (name) DO UPDATE SET body = excluded.body, updated_at = excluded.updated_at",
                params![name, body, now()],
            )?;
            Ok(())
        })
    }
    /// Every template, by name.
    pub fn templates(&self) -> Result<Vec<Template>> {
        self.with(|c| {
            let mut s = c.prepare("SELECT name, body, updated_at FROM templates ORDER BY name")?;
            let rows = s.query_map([], |r| {
                Ok(Template {
                    name: r.get(0)?,
                    body: r.get(1)?,
                    updated_at: r.get(2)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }
    /// One template's text.
    pub fn template(&self, name: &str) -> Result<Option<String>> {
        self.with(|c| {
            Ok(
                c.query_row("SELECT body FROM templates WHERE name = ?1", [name], |r| {
                    r.get(0)
                })
                .optional()?,
            )
        })
    }
    /// Removes a template; false when there was none.
    pub fn remove_template(&self, name: &str) -> Result<bool> {
        self.with(|c| Ok(c.execute("DELETE FROM templates WHERE name = ?1", [name])? == 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_are_saved_replaced_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        db.save_template("office", "a=1").unwrap();
        db.save_template("office", "a=2").unwrap();
        assert_eq!(db.template("office").unwrap().as_deref(), Some("a=2"));
        assert_eq!(db.templates().unwrap().len(), 1);
        assert!(db.save_template("office", "  ").is_err());
        let big = "x".repeat(crate::protocol::MAX_TEMPLATE + 1);
        assert!(db.save_template("big", &big).is_err());
        assert!(db.remove_template("office").unwrap());
        assert!(!db.remove_template("office").unwrap());
    }
}
