//! Combining whole JSON answers into one, for the strategies that need
//! them: `all` and `quorum` key the answers by branch, `vote` picks the
//! majority's answer, `mean` averages numeric tensors element-wise.
//! Pure functions over parsed answers; the race that collects them is in
//! the parent module.

use serde_json::{Map, Value};

/// The answers keyed by branch name: the shape of a KServe InferenceGraph
/// `Ensemble` step.
pub(super) fn keyed<'a>(answers: impl IntoIterator<Item = (&'a str, Value)>) -> Map<String, Value> {
    answers
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect()
}

/// One distinct value voted for.
#[derive(Debug, PartialEq)]
pub(super) struct Tally<'a> {
    /// The value.
    pub(super) value: &'a Value,
    /// How many branches voted for it.
    pub(super) votes: usize,
    /// The best tie-break rank among its voters (lower wins).
    pub(super) best_rank: usize,
}

/// The value with the most votes, a tie going to the value whose best
/// voter ranks first. `ballots` are each voter's tie-break rank and vote.
pub(super) fn leader<'a>(
    ballots: impl IntoIterator<Item = (usize, &'a Value)>,
) -> Option<Tally<'a>> {
    let mut tallies: Vec<Tally<'a>> = Vec::new();
    for (rank, value) in ballots {
        match tallies.iter_mut().find(|t| t.value == value) {
            Some(t) => {
                t.votes += 1;
                t.best_rank = t.best_rank.min(rank);
            }
            None => tallies.push(Tally {
                value,
                votes: 1,
                best_rank: rank,
            }),
        }
    }
    tallies
        .into_iter()
        .min_by_key(|t| (std::cmp::Reverse(t.votes), t.best_rank))
}

/// Why an answer cannot be averaged with the first one.
#[derive(Debug, PartialEq)]
pub(super) struct Incompatible {
    /// Its position in the answers given.
    pub(super) index: usize,
    /// What is wrong with it.
    pub(super) reason: String,
}

/// The element-wise weighted mean of the answers' numeric tensors, in the
/// shape of the first answer: at `pointer` in each answer, or else each of
/// a KServe v2 answer's `outputs[].data`, matched by output name (integer
/// outputs become `FP64`). Fails naming the first answer that has no such
/// tensor or one of another shape.
pub(super) fn mean(
    answers: &[(&Value, f64)],
    pointer: Option<&str>,
) -> Result<Value, Incompatible> {
    let Some(&(base, _)) = answers.first() else {
        return Err(Incompatible {
            index: 0,
            reason: "no answers to average".into(),
        });
    };
    let mut combined = base.clone();
    match pointer {
        Some(pointer) => {
            let tensors = answers
                .iter()
                .enumerate()
                .map(|(index, (answer, weight))| {
                    let tensor = answer.pointer(pointer).ok_or_else(|| Incompatible {
                        index,
                        reason: format!("the answer has nothing at {pointer}"),
                    })?;
                    Ok((tensor, *weight))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let averaged = average(&tensors)?;
            *combined
                .pointer_mut(pointer)
                .expect("the first answer has the pointer") = averaged;
        }
        None => {
            let outputs = |index: usize, answer: &Value| -> Result<Vec<Value>, Incompatible> {
                answer["outputs"]
                    .as_array()
                    .filter(|o| !o.is_empty())
                    .cloned()
                    .ok_or_else(|| Incompatible {
                        index,
                        reason: "the answer has no KServe v2 `outputs`".into(),
                    })
            };
            let mut merged = outputs(0, base)?;
            for output in &mut merged {
                let name = output["name"].as_str().unwrap_or_default().to_owned();
                let mut tensors = Vec::with_capacity(answers.len());
                for (index, (answer, weight)) in answers.iter().enumerate() {
                    let theirs = outputs(index, answer)?;
                    let data = theirs
                        .iter()
                        .find(|o| o["name"] == output["name"])
                        .map(|o| o["data"].clone())
                        .ok_or_else(|| Incompatible {
                            index,
                            reason: format!("the answer has no output {name:?}"),
                        })?;
                    tensors.push((data, *weight));
                }
                let borrowed: Vec<(&Value, f64)> = tensors.iter().map(|(d, w)| (d, *w)).collect();
                output["data"] = average(&borrowed).map_err(|e| Incompatible {
                    index: e.index,
                    reason: format!("output {name:?}: {}", e.reason),
                })?;
                let integer = output["datatype"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("INT") || t.starts_with("UINT"));
                if integer {
                    output["datatype"] = "FP64".into();
                }
            }
            combined["outputs"] = Value::Array(merged);
        }
    }
    Ok(combined)
}

/// The weighted mean of same-shaped (possibly nested) arrays of numbers.
fn average(tensors: &[(&Value, f64)]) -> Result<Value, Incompatible> {
    let (base, _) = tensors[0];
    let mut sums = Vec::new();
    flatten(base, &mut sums).map_err(|reason| Incompatible { index: 0, reason })?;
    sums.iter_mut().for_each(|x| *x = 0.0);
    let mut total_weight = 0.0;
    let mut numbers = Vec::with_capacity(sums.len());
    for (index, (tensor, weight)) in tensors.iter().enumerate() {
        numbers.clear();
        flatten(tensor, &mut numbers).map_err(|reason| Incompatible { index, reason })?;
        if !same_shape(base, tensor) {
            return Err(Incompatible {
                index,
                reason: "its tensor has another shape than the first answer's".into(),
            });
        }
        for (sum, x) in sums.iter_mut().zip(&numbers) {
            *sum += weight * x;
        }
        total_weight += weight;
    }
    let mut means = sums.into_iter().map(|s| s / total_weight);
    Ok(rebuild(base, &mut means))
}

/// Appends the numbers of a (nested) array, or says why it is not one.
fn flatten(value: &Value, out: &mut Vec<f64>) -> Result<(), String> {
    match value {
        Value::Number(n) => {
            out.push(n.as_f64().expect("JSON numbers are finite"));
            Ok(())
        }
        Value::Array(items) => items.iter().try_for_each(|item| flatten(item, out)),
        other => Err(format!(
            "expected numbers, found {}",
            match other {
                Value::Null => "null",
                Value::Bool(_) => "a boolean",
                Value::String(_) => "a string",
                _ => "an object",
            }
        )),
    }
}

fn same_shape(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(a, b)| same_shape(a, b))
        }
        (Value::Array(_), _) | (_, Value::Array(_)) => false,
        _ => true,
    }
}

/// `shape` with its numbers replaced, in order, by `numbers`.
fn rebuild(shape: &Value, numbers: &mut impl Iterator<Item = f64>) -> Value {
    match shape {
        Value::Array(items) => Value::Array(items.iter().map(|i| rebuild(i, numbers)).collect()),
        _ => numbers.next().map_or(Value::Null, Value::from),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_majority_wins_and_a_tie_goes_to_the_best_ranked_voter() {
        let (yes, no) = (json!("yes"), json!("no"));
        let won = leader([(2, &yes), (0, &no), (1, &yes)]).unwrap();
        assert_eq!((won.value, won.votes, won.best_rank), (&yes, 2, 1));
        // One each: the value of rank 0 wins, whatever the arrival order.
        assert_eq!(leader([(1, &yes), (0, &no)]).unwrap().value, &no);
        assert_eq!(leader([(0, &no), (1, &yes)]).unwrap().value, &no);
        assert_eq!(leader(std::iter::empty()), None);
        // Values compare as JSON: 1 and 1.0 differ from "1".
        let (one, text) = (json!(1), json!("1"));
        assert_eq!(
            leader([(0, &text), (1, &one), (2, &one)]).unwrap().value,
            &one
        );
    }

    #[test]
    fn kserve_outputs_are_averaged_by_name_with_weights() {
        let a = json!({ "model_name": "a", "outputs": [
            { "name": "scores", "datatype": "FP32", "shape": [3], "data": [1.0, 2.0, 3.0] },
            { "name": "count", "datatype": "INT64", "shape": [1], "data": [1] },
        ]});
        let b = json!({ "model_name": "b", "outputs": [
            { "name": "count", "datatype": "INT64", "shape": [1], "data": [4] },
            { "name": "scores", "datatype": "FP32", "shape": [3], "data": [4.0, 8.0, 12.0] },
        ]});
        let averaged = mean(&[(&a, 2.0), (&b, 1.0)], None).unwrap();
        assert_eq!(averaged["model_name"], "a");
        assert_eq!(averaged["outputs"][0]["data"], json!([2.0, 4.0, 6.0]));
        assert_eq!(averaged["outputs"][0]["datatype"], "FP32");
        assert_eq!(averaged["outputs"][1]["data"], json!([2.0]));
        assert_eq!(averaged["outputs"][1]["datatype"], "FP64");
    }

    #[test]
    fn a_pointer_averages_nested_arrays_in_place() {
        let a = json!({ "data": [{ "embedding": [[1, 2], [3, 4]] }], "model": "a" });
        let b = json!({ "data": [{ "embedding": [[3, 4], [5, 6]] }], "model": "b" });
        let averaged = mean(&[(&a, 1.0), (&b, 1.0)], Some("/data/0/embedding")).unwrap();
        assert_eq!(
            averaged,
            json!({ "data": [{ "embedding": [[2.0, 3.0], [4.0, 5.0]] }], "model": "a" })
        );
    }

    #[test]
    fn an_answer_that_cannot_be_averaged_is_named() {
        let a = json!({ "v": [1, 2] });
        let short = json!({ "v": [1] });
        let text = json!({ "v": ["x", "y"] });
        let missing = json!({ "w": [1, 2] });
        let at = Some("/v");
        assert_eq!(mean(&[(&a, 1.0), (&short, 1.0)], at).unwrap_err().index, 1);
        let err = mean(&[(&a, 1.0), (&a, 1.0), (&text, 1.0)], at).unwrap_err();
        assert_eq!(
            (err.index, err.reason.as_str()),
            (2, "expected numbers, found a string")
        );
        assert_eq!(
            mean(&[(&missing, 1.0), (&a, 1.0)], at).unwrap_err().index,
            0
        );
        let no_outputs = mean(&[(&a, 1.0)], None).unwrap_err();
        assert_eq!(no_outputs.reason, "the answer has no KServe v2 `outputs`");
    }
}
