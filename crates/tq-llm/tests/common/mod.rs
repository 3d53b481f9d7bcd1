//! What the golden tests of the forward pass share: the passage and the
//! checked positions and tolerances, and the pure helpers on logits rows.
// each test binary includes this module and uses most, not all, of it
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::Value;

/// Tokens of the forward pass.
pub const CTX: usize = 256;
/// First position whose next-token NLL is scored (`NLL_FROM..CTX-1`).
pub const NLL_FROM: usize = 128;
/// Positions whose logits are compared at their top-8 token ids.
pub const LOGIT_POSITIONS: [usize; 4] = [0, 37, 150, 255];
pub const TOP: usize = 8;
/// Largest |Δ| of the mean NLL (nats).
pub const NLL_TOL: f64 = 1e-3;
/// Largest |Δ| of a logit, relative to the position's logit scale.
pub const LOGIT_TOL: f64 = 1e-3;

/// The opening of Jane Austen's *Persuasion* (1818; public domain), as in
/// Project Gutenberg's text (Debian's r-cran-janeaustenr): digits, dates,
/// punctuation, possessives, an indented line, runs of newlines.
pub const PASSAGE: &str = r#"Persuasion


by

Jane Austen

(1818)




Chapter 1


Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who,
for his own amusement, never took up any book but the Baronetage; there
he found occupation for an idle hour, and consolation in a distressed
one; there his faculties were roused into admiration and respect, by
contemplating the limited remnant of the earliest patents; there any
unwelcome sensations, arising from domestic affairs changed naturally
into pity and contempt as he turned over the almost endless creations
of the last century; and there, if every other leaf were powerless, he
could read his own history with an interest which never failed.  This
was the page at which the favourite volume always opened:

           "ELLIOT OF KELLYNCH HALL.

"Walter Elliot, born March 1, 1760, married, July 15, 1784, Elizabeth,
daughter of James Stevenson, Esq. of South Park, in the county of
Gloucester, by which lady (who died 1800) he has issue Elizabeth, born
June 1, 1785; Anne, born August 9, 1787; a still-born son, November 5,
1789; Mary, born November 20, 1791."

Precisely such had the paragraph originally stood from the printer's
hands; but Sir Walter had improved it by adding, for the information of
himself and his family, these words, after the date of Mary's birth--
"Married, December 16, 1810, Charles, son and heir of Charles Musgrove,
Esq. of Uppercross, in the county of Somerset," and by inserting most
accurately the day of the month on which he had lost his wife.

Then followed the history and rise of the ancient and respectable
family, in the usual terms; how it had been first settled in Cheshire;
how mentioned in Dugdale, serving the office of high sheriff,
representing a borough in three successive parliaments, exertions of
loyalty, and dignity of baronet, in the first year of Charles II, with
all the Marys and Elizabeths they had married; forming altogether two
handsome duodecimo pages, and concluding with the arms and
motto:--"Principal seat, Kellynch Hall, in the county of Somerset," and
Sir Walter's handwriting again in this finale:--

"Heir presumptive, William Walter Elliot, Esq., great grandson of the
second Sir Walter.""#;

/// Index of the first maximum.
pub fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0
}

/// The top-`TOP` token ids of a row and their logits.
pub fn top(v: &[f32]) -> Vec<(usize, f32)> {
    let mut ix: Vec<usize> = (0..v.len()).collect();
    ix.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    ix.into_iter().take(TOP).map(|i| (i, v[i])).collect()
}

pub fn usizes(v: &Value, key: &str) -> Vec<usize> {
    v[key].as_array().unwrap_or_else(|| panic!("recording: '{key}' is not an array")).iter().map(|x| x.as_u64().expect("an integer") as usize).collect()
}

/// Mean NLL (nats) of token `pos+1` at positions `NLL_FROM..CTX-1` of
/// `logits` (rows of `vocab`) over `ids`, log-softmax in f64.
pub fn mean_nll(logits: &[f32], vocab: usize, ids: &[u32]) -> f64 {
    let nll = |pos: usize| {
        let v = &logits[pos * vocab..(pos + 1) * vocab];
        let m = v.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = m + v.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
        lse - v[ids[pos + 1] as usize] as f64
    };
    (NLL_FROM..CTX - 1).map(nll).sum::<f64>() / (CTX - 1 - NLL_FROM) as f64
}

/// `tests/golden/<name>`.
pub fn golden_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name)
}

/// The recording at `path`: written from `record()` when `TQ_RECORD_GOLDEN=1`,
/// else read (a missing or unreadable file fails the test); read once per
/// test binary into `cell`.
pub fn golden<'a>(cell: &'a OnceLock<Value>, path: &Path, record: impl FnOnce() -> String) -> &'a Value {
    cell.get_or_init(|| {
        if std::env::var("TQ_RECORD_GOLDEN").is_ok_and(|v| v == "1") {
            let text = record();
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, &text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
            eprintln!("recorded {}", path.display());
        }
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("no golden recording {} ({e}); record it with TQ_RECORD_GOLDEN=1", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", path.display()))
    })
}

/// The mean NLL `got` against the recording's, within [`NLL_TOL`].
pub fn check_mean_nll(g: &Value, got: f64) {
    let want = g["mean_nll"].as_f64().expect("mean_nll");
    assert!((got - want).abs() < NLL_TOL, "mean NLL over positions {NLL_FROM}..{} is {got} (ppl {}), recorded {want} (ppl {})", CTX - 1, got.exp(), want.exp());
}

/// The recorded top-[`TOP`] logits at [`LOGIT_POSITIONS`] against the rows
/// `row(position)` of a run, within [`LOGIT_TOL`] of the largest recorded logit.
pub fn check_logits<'a>(g: &Value, row: impl Fn(usize) -> &'a [f32]) {
    let recs = g["logits"].as_array().expect("logits");
    assert_eq!(recs.len(), LOGIT_POSITIONS.len());
    for (rec, &p) in recs.iter().zip(&LOGIT_POSITIONS) {
        assert_eq!(rec["position"].as_u64(), Some(p as u64), "recorded with other logit positions");
        let ids = usizes(rec, "ids");
        let want: Vec<f64> = rec["logits"].as_array().expect("logits").iter().map(|x| x.as_f64().expect("a number")).collect();
        assert_eq!((ids.len(), want.len()), (TOP, TOP));
        let scale = want.iter().fold(1.0f64, |m, x| m.max(x.abs()));
        let v = row(p);
        for (&id, &w) in ids.iter().zip(&want) {
            let got = v[id] as f64;
            assert!(
                (got - w).abs() < LOGIT_TOL * scale,
                "position {p}, token {id}: logit {got}, recorded {w} (|Δ| {:.3e}, allowed {:.3e})",
                (got - w).abs(),
                LOGIT_TOL * scale
            );
        }
    }
}
