//! The fan-out combiners (proxy/src/route/fanout/combine.rs, exported as
//! `hot_path::{keyed, leader, mean}`) on a set of branch answers, each
//! with a branch name, a weight (finite and above 0, as config validation
//! makes it) and a tie-break rank.
//!
//! The input is either JSON, when it starts with `{` (readable seeds and
//! reproducers):
//!
//! ```json
//! {"answers": [..], "names": [..], "weights": [..], "ranks": [..], "pointer": "/v"}
//! ```
//!
//! every field optional (names default to `b0`, `b1`.., weights to 1,
//! ranks to the answer's position), or else bytes from which answers are
//! generated: mostly KServe v2 answers (`outputs[]` with `name`,
//! `datatype`, `data`) and answers with tensors at a pointer, nested
//! arrays of numbers, names made of the characters tensor signatures use.
//!
//! Asserted:
//! - no combiner panics, whatever the answers;
//! - `keyed` has one entry per distinct branch name, holding the last
//!   answer given under it;
//! - `leader` has a winner exactly when there are ballots; the winner is
//!   one of the answers given (the very value), its `votes` count the
//!   ballots equal to it and `best_rank` is their lowest rank; no value
//!   has more votes, nor as many with a lower rank;
//! - `mean` leaves answers out by valid, increasing index, and has a value
//!   exactly when it keeps at least one;
//! - the mean of copies of one answer, under any weights, is that answer
//!   (its numbers within 1e-9 relative, integers as floats, integer
//!   KServe datatypes as `FP64`), nothing left out; and copies of an
//!   answer without tensors are all left out.

#![no_main]

use arbitrary::{Result, Unstructured};
use infermesh_proxy::hot_path::{keyed, leader, mean};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value, json};

/// The answers of one fan-out, with what each branch brings.
#[derive(Debug)]
struct Case {
    answers: Vec<Value>,
    names: Vec<String>,
    weights: Vec<f64>,
    ranks: Vec<usize>,
    pointer: Option<String>,
}

/// Nesting beyond which answers are not generated (upstream answers are
/// parsed by serde_json, which stops at 128).
const DEPTH: usize = 8;

fuzz_target!(|data: &[u8]| {
    let case = if data.first() == Some(&b'{') {
        from_json(data)
    } else {
        generate(&mut Unstructured::new(data)).ok()
    };
    let Some(case) = case else { return };
    check_keyed(&case);
    check_leader(&case);
    check_mean(&case);
    check_mean_of_copies(&case);
});

fn check_keyed(case: &Case) {
    let pairs = case
        .names
        .iter()
        .map(String::as_str)
        .zip(case.answers.iter().cloned());
    let map = keyed(pairs);
    let mut distinct: Vec<&str> = case.names.iter().map(String::as_str).collect();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(map.len(), distinct.len(), "{case:?}");
    for name in distinct {
        let last = case
            .names
            .iter()
            .rposition(|n| n == name)
            .map(|i| &case.answers[i]);
        assert_eq!(map.get(name), last, "{case:?}: {name:?}");
    }
}

fn check_leader(case: &Case) {
    let ballots: Vec<(usize, &Value)> = case.ranks.iter().copied().zip(&case.answers).collect();
    let Some(won) = leader(ballots.iter().copied()) else {
        assert!(ballots.is_empty(), "{case:?}: no winner");
        return;
    };
    assert!(
        case.answers.iter().any(|a| std::ptr::eq(a, won.value)),
        "{case:?}: the winner is not one of the answers"
    );
    let tally = |value: &Value| {
        let voters: Vec<usize> = ballots
            .iter()
            .filter(|(_, v)| *v == value)
            .map(|(r, _)| *r)
            .collect();
        (voters.len(), voters.into_iter().min().unwrap_or(usize::MAX))
    };
    assert_eq!((won.votes, won.best_rank), tally(won.value), "{case:?}");
    for (_, value) in &ballots {
        let (votes, best_rank) = tally(value);
        assert!(
            votes < won.votes || (votes == won.votes && best_rank >= won.best_rank),
            "{case:?}: {value} beats the winner {}",
            won.value
        );
    }
}

fn check_mean(case: &Case) {
    let weighted: Vec<(&Value, f64)> = case
        .answers
        .iter()
        .zip(case.weights.iter().copied())
        .collect();
    let averaged = mean(&weighted, case.pointer.as_deref());
    let indexes: Vec<usize> = averaged.left_out.iter().map(|l| l.index).collect();
    assert!(
        indexes.windows(2).all(|w| w[0] < w[1]) && indexes.iter().all(|i| *i < weighted.len()),
        "{case:?}: left out {indexes:?}"
    );
    assert_eq!(
        averaged.value.is_some(),
        indexes.len() < weighted.len(),
        "{case:?}: {averaged:?}"
    );
}

fn check_mean_of_copies(case: &Case) {
    let Some(answer) = case.answers.first() else {
        return;
    };
    let pointer = case.pointer.as_deref();
    let copies: Vec<(&Value, f64)> = case.weights.iter().map(|w| (answer, *w)).collect();
    let averaged = mean(&copies, pointer);
    if mean(&[(answer, 1.0)], pointer).value.is_none() {
        assert_eq!(averaged.value, None, "{case:?}");
        assert_eq!(averaged.left_out.len(), copies.len(), "{case:?}");
        return;
    }
    assert_eq!(averaged.left_out, [], "{case:?}: copies left out");
    let value = averaged.value.expect("copies of an answer with tensors");
    // Sums of numbers this large may overflow, of weights this far apart
    // lose the smaller: out of the property's range.
    let tame = |w: &f64| (1.0 / 1024.0..=1024.0).contains(w);
    if largest(answer) <= 1e300
        && case.weights.iter().all(tame)
        && let Err(why) = same(&value, answer, "")
    {
        panic!("{case:?}: the mean of copies is not the answer: {why}\n{value}");
    }
}

/// The largest magnitude of a number in `value`.
fn largest(value: &Value) -> f64 {
    match value {
        Value::Number(n) => n.as_f64().map_or(f64::INFINITY, f64::abs),
        Value::Array(items) => items.iter().map(largest).fold(0.0, f64::max),
        Value::Object(map) => map.values().map(largest).fold(0.0, f64::max),
        _ => 0.0,
    }
}

/// Whether `got` is `want` up to float rounding and an integer datatype
/// become `FP64`.
fn same(got: &Value, want: &Value, key: &str) -> std::result::Result<(), String> {
    match (got, want) {
        (Value::Number(g), Value::Number(w)) => {
            let (g, w) = (g.as_f64().unwrap(), w.as_f64().unwrap());
            if (g - w).abs() <= 1e-9 * g.abs().max(w.abs()) + 1e-300 {
                Ok(())
            } else {
                Err(format!("{key}: {g} is not {w}"))
            }
        }
        (Value::String(g), Value::String(w))
            if key == "datatype"
                && g == "FP64"
                && (w.starts_with("INT") || w.starts_with("UINT")) =>
        {
            Ok(())
        }
        (Value::Array(g), Value::Array(w)) if g.len() == w.len() => {
            g.iter().zip(w).try_for_each(|(g, w)| same(g, w, key))
        }
        (Value::Object(g), Value::Object(w)) if g.keys().eq(w.keys()) => g
            .iter()
            .zip(w.values())
            .try_for_each(|((k, g), w)| same(g, w, k)),
        _ if got == want => Ok(()),
        _ => Err(format!("{key}: {got} is not {want}")),
    }
}

/// A case written as JSON.
fn from_json(data: &[u8]) -> Option<Case> {
    let Value::Object(mut input) = serde_json::from_slice(data).ok()? else {
        return None;
    };
    let mut list = |key: &str| match input.remove(key) {
        Some(Value::Array(items)) => items,
        _ => Vec::new(),
    };
    let answers = list("answers");
    let (names, weights, ranks) = (list("names"), list("weights"), list("ranks"));
    let n = answers.len();
    Some(Case {
        names: (0..n)
            .map(|i| match names.get(i) {
                Some(Value::String(name)) => name.clone(),
                _ => format!("b{i}"),
            })
            .collect(),
        weights: (0..n)
            .map(|i| {
                weights
                    .get(i)
                    .and_then(Value::as_f64)
                    .filter(|w| w.is_finite() && *w > 0.0)
                    .unwrap_or(1.0)
            })
            .collect(),
        ranks: (0..n)
            .map(|i| {
                ranks
                    .get(i)
                    .and_then(Value::as_u64)
                    .map_or(i, |r| r as usize)
            })
            .collect(),
        pointer: input
            .get("pointer")
            .and_then(Value::as_str)
            .map(str::to_owned),
        answers,
    })
}

/// A case generated from bytes.
fn generate(u: &mut Unstructured<'_>) -> Result<Case> {
    let pointer = match u.int_in_range(0..=5)? {
        0..=2 => None,
        3 => Some("/v".to_owned()),
        4 => Some("/data/0/embedding".to_owned()),
        _ => Some(format!("/{}", name(u)?)),
    };
    let n = u.int_in_range(0..=6)?;
    let mut case = Case {
        answers: Vec::with_capacity(n),
        names: Vec::with_capacity(n),
        weights: Vec::with_capacity(n),
        ranks: Vec::with_capacity(n),
        pointer,
    };
    for _ in 0..n {
        case.answers.push(answer(u)?);
        case.names.push(name(u)?);
        case.weights.push(weight(u)?);
        case.ranks.push(u.int_in_range(0..=7)?);
    }
    Ok(case)
}

fn answer(u: &mut Unstructured<'_>) -> Result<Value> {
    Ok(match u.int_in_range(0..=3)? {
        0 | 1 => {
            let outputs = (0..u.int_in_range(0..=3)?)
                .map(|_| output(u))
                .collect::<Result<Vec<_>>>()?;
            json!({ "model_name": name(u)?, "outputs": outputs })
        }
        2 => json!({
            "v": tensor(u, 0)?,
            "data": [{ "embedding": tensor(u, 0)? }],
            "model": name(u)?,
        }),
        _ => any(u, 0)?,
    })
}

fn output(u: &mut Unstructured<'_>) -> Result<Value> {
    let mut output = Map::new();
    match u.int_in_range(0..=9)? {
        0 => {}
        1 => {
            output.insert("name".into(), any(u, DEPTH)?);
        }
        _ => {
            output.insert("name".into(), name(u)?.into());
        }
    }
    const DATATYPES: [&str; 6] = ["FP32", "FP64", "INT64", "UINT8", "BYTES", "BOOL"];
    if u.arbitrary()? {
        output.insert("datatype".into(), (*u.choose(&DATATYPES)?).into());
    }
    output.insert("data".into(), tensor(u, 0)?);
    Ok(Value::Object(output))
}

/// Mostly nested arrays of numbers.
fn tensor(u: &mut Unstructured<'_>, depth: usize) -> Result<Value> {
    Ok(match u.int_in_range(0..=9)? {
        0..=4 => number(u)?,
        5..=8 if depth < DEPTH => Value::Array(
            (0..u.int_in_range(0..=4)?)
                .map(|_| tensor(u, depth + 1))
                .collect::<Result<_>>()?,
        ),
        _ => any(u, depth + 1)?,
    })
}

fn any(u: &mut Unstructured<'_>, depth: usize) -> Result<Value> {
    Ok(match u.int_in_range(0..=6)? {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => number(u)?,
        3 => name(u)?.into(),
        4 if depth < DEPTH => Value::Array(
            (0..u.int_in_range(0..=3)?)
                .map(|_| any(u, depth + 1))
                .collect::<Result<_>>()?,
        ),
        5 if depth < DEPTH => Value::Object(
            (0..u.int_in_range(0..=3)?)
                .map(|_| Ok((name(u)?, any(u, depth + 1)?)))
                .collect::<Result<_>>()?,
        ),
        _ => Value::Null,
    })
}

/// A number; a float that is NaN or infinite becomes null (as
/// `Value::from` makes it), since no upstream answer parses to one.
fn number(u: &mut Unstructured<'_>) -> Result<Value> {
    Ok(match u.int_in_range(0..=3)? {
        0 => u.arbitrary::<i8>()?.into(),
        1 => u.arbitrary::<i64>()?.into(),
        2 => u.arbitrary::<u64>()?.into(),
        _ => Value::from(u.arbitrary::<f64>()?),
    })
}

/// A name: mostly of the characters a tensor signature is written with,
/// else any short text.
fn name(u: &mut Unstructured<'_>) -> Result<String> {
    if u.arbitrary()? {
        const ALPHABET: [char; 7] = ['a', 'b', 'n', ':', ';', '[', ']'];
        (0..u.int_in_range(0..=6)?)
            .map(|_| u.choose(&ALPHABET).copied())
            .collect()
    } else {
        Ok(u.arbitrary::<&str>()?.chars().take(16).collect())
    }
}

/// A weight config validation allows: finite and above 0.
fn weight(u: &mut Unstructured<'_>) -> Result<f64> {
    Ok(match u.int_in_range(0..=2)? {
        0 => 1.0,
        1 => f64::from(u.int_in_range(1..=16u8)?) / 4.0,
        _ => Some(u.arbitrary::<f64>()?)
            .filter(|w| w.is_finite() && *w > 0.0)
            .unwrap_or(1.0),
    })
}
