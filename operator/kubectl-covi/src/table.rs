//! Output as kubectl prints it: aligned columns (`-o table`, the default), or CSV and
//! JSON for scripts.

use clap::ValueEnum;
use serde_json::{Map, Value};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Default)]
pub enum Output {
    /// Aligned columns with a header, as kubectl get prints.
    #[default]
    Table,
    /// Comma-separated values with a header row (RFC 4180 quoting).
    Csv,
    /// A JSON array of objects keyed by the column names in camelCase.
    Json,
}

/// Rows under a header, rendered in one of the output formats.
#[derive(Debug, Default)]
pub struct Table {
    pub header: Vec<&'static str>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&'static str]) -> Table {
        Table { header: header.to_vec(), rows: Vec::new() }
    }

    pub fn push(&mut self, row: Vec<String>) {
        debug_assert_eq!(row.len(), self.header.len());
        self.rows.push(row);
    }

    pub fn render(&self, output: Output) -> String {
        match output {
            Output::Table => self.aligned(),
            Output::Csv => self.csv(),
            Output::Json => {
                let list: Vec<Value> = self
                    .rows
                    .iter()
                    .map(|row| {
                        let object: Map<String, Value> = self
                            .header
                            .iter()
                            .zip(row)
                            .map(|(h, v)| (camel_case(h), Value::String(v.clone())))
                            .collect();
                        Value::Object(object)
                    })
                    .collect();
                serde_json::to_string_pretty(&list).unwrap_or_default() + "\n"
            }
        }
    }

    /// Columns padded to their widest cell and three spaces apart, as kubectl prints.
    fn aligned(&self) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |cells: Vec<&str>| {
            let last = cells.len().saturating_sub(1);
            let mut out = String::new();
            for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
                out.push_str(cell);
                if i < last {
                    out.push_str(&" ".repeat(w - cell.chars().count() + 3));
                }
            }
            out.push('\n');
            out
        };
        let mut out = line(self.header.clone());
        for row in &self.rows {
            out.push_str(&line(row.iter().map(String::as_str).collect()));
        }
        out
    }

    fn csv(&self) -> String {
        let line = |cells: &mut dyn Iterator<Item = &str>| {
            let quoted: Vec<String> = cells
                .map(|c| {
                    if c.contains([',', '"', '\n', '\r']) {
                        format!("\"{}\"", c.replace('"', "\"\""))
                    } else {
                        c.to_string()
                    }
                })
                .collect();
            quoted.join(",") + "\n"
        };
        let mut out = line(&mut self.header.iter().copied());
        for row in &self.rows {
            out.push_str(&line(&mut row.iter().map(String::as_str)));
        }
        out
    }
}

/// "CPU(cores)" → "cpuCores", "NAME" → "name", "APPROVED BY" → "approvedBy".
fn camel_case(header: &str) -> String {
    let mut out = String::new();
    for (i, word) in header.split(|c: char| !c.is_ascii_alphanumeric()).filter(|w| !w.is_empty()).enumerate() {
        let lower = word.to_ascii_lowercase();
        if i == 0 {
            out.push_str(&lower);
        } else {
            let mut chars = lower.chars();
            if let Some(first) = chars.next() {
                out.push(first.to_ascii_uppercase());
                out.extend(chars);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Table {
        let mut t = Table::new(&["NAME", "CPU(cores)", "APPROVED BY"]);
        t.push(vec!["web-1".into(), "950m".into(), "bob".into()]);
        t.push(vec!["db".into(), "12m".into(), "carol, \"the\" approver".into()]);
        t
    }

    #[test]
    fn tables_align_columns_as_kubectl_does() {
        assert_eq!(
            sample().render(Output::Table),
            "NAME    CPU(cores)   APPROVED BY\n\
             web-1   950m         bob\n\
             db      12m          carol, \"the\" approver\n"
        );
    }

    #[test]
    fn csv_quotes_what_needs_quoting_and_json_uses_camel_case_keys() {
        assert_eq!(
            sample().render(Output::Csv),
            "NAME,CPU(cores),APPROVED BY\nweb-1,950m,bob\ndb,12m,\"carol, \"\"the\"\" approver\"\n"
        );
        let json: Value = serde_json::from_str(&sample().render(Output::Json)).unwrap();
        assert_eq!(json[0]["cpuCores"], "950m");
        assert_eq!(json[1]["approvedBy"], "carol, \"the\" approver");
    }
}
