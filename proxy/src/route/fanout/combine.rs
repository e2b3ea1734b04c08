//! Combining whole JSON answers into one, for the strategies that need
//! them: `all` and `quorum` key the answers by branch, `vote` picks the
//! majority's answer, `mean` averages numeric tensors element-wise.
//! Pure functions over parsed answers; the race that collects them is in
//! the parent module.

use serde_json::{Map, Value};

/// The answers keyed by branch name: the shape of a KServe InferenceGraph
/// `Ensemble` step.
pub fn keyed<'a>(answers: impl IntoIterator<Item = (&'a str, Value)>) -> Map<String, Value> {
    answers
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect()
}

/// One distinct value voted for.
#[derive(Debug, PartialEq)]
pub struct Tally<'a> {
    /// The value.
    pub value: &'a Value,
    /// How many branches voted for it.
    pub votes: usize,
    /// The best tie-break rank among its voters (lower wins).
    pub best_rank: usize,
}

/// The value with the most votes, a tie going to the value whose best
/// voter ranks first. `ballots` are each voter's tie-break rank and vote.
pub fn leader<'a>(ballots: impl IntoIterator<Item = (usize, &'a Value)>) -> Option<Tally<'a>> {
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

/// An answer a mean leaves out, and why.
#[derive(Debug, PartialEq)]
pub struct Incompatible {
    /// Its position in the answers given.
    pub index: usize,
    /// What is wrong with it.
    pub reason: String,
}

/// What a mean makes of the answers.
#[derive(Debug, PartialEq)]
pub struct Averaged {
    /// The answer averaged over the largest group of answers whose tensors
    /// have the same names and shapes; none when no answer has tensors.
    pub value: Option<Value>,
    /// The answers left out.
    pub left_out: Vec<Incompatible>,
}

/// The element-wise weighted mean of the answers' numeric tensors: the
/// array at `pointer` in each answer, or else each of a KServe v2 answer's
/// `outputs[].data`, by output name (integer outputs become `FP64`).
///
/// The answers averaged are the largest group whose tensors have the same
/// names and shapes (a tie goes to the group of the earliest answer); the
/// rest are left out, so one odd model cannot veto the others. The result
/// is the group's first answer with its tensors replaced by the means.
pub fn mean(answers: &[(&Value, f64)], pointer: Option<&str>) -> Averaged {
    let shapes: Vec<Result<(Tensors<'_>, String), String>> = answers
        .iter()
        .map(|(answer, _)| {
            let tensors = tensors_of(answer, pointer)?;
            let shape = signature(&tensors)?;
            Ok((tensors, shape))
        })
        .collect();
    let group_of = |shape: &String| {
        shapes
            .iter()
            .enumerate()
            .filter(|(_, s)| s.as_ref().is_ok_and(|(_, other)| other == shape))
            .map(|(i, _)| i)
            .collect::<Vec<_>>()
    };
    let mut group: Vec<usize> = Vec::new();
    for (_, shape) in shapes.iter().flatten() {
        let candidate = group_of(shape);
        if candidate.len() > group.len() {
            group = candidate;
        }
    }
    let left_out = shapes
        .iter()
        .enumerate()
        .filter(|(i, _)| !group.contains(i))
        .map(|(index, shape)| Incompatible {
            index,
            reason: match shape {
                Err(reason) => reason.clone(),
                Ok(_) => {
                    "its tensors differ in name or shape from those of the most answers".to_owned()
                }
            },
        })
        .collect();
    let Some(&first) = group.first() else {
        return Averaged {
            value: None,
            left_out,
        };
    };
    let Ok((base_tensors, _)) = &shapes[first] else {
        unreachable!("the group holds answers with tensors")
    };
    let mut averaged = answers[first].0.clone();
    for (position, (name, base)) in base_tensors.iter().enumerate() {
        let mut sums = Vec::new();
        let mut total_weight = 0.0;
        let mut numbers = Vec::new();
        for &i in &group {
            let Ok((tensors, _)) = &shapes[i] else {
                unreachable!("the group holds answers with tensors")
            };
            let data = tensors
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, d)| *d)
                .expect("answers of one group have the same tensor names");
            numbers.clear();
            flatten(data, &mut numbers);
            sums.resize(numbers.len(), 0.0);
            let weight = answers[i].1;
            for (sum, x) in sums.iter_mut().zip(&numbers) {
                *sum += weight * x;
            }
            total_weight += weight;
        }
        let mut means = sums.into_iter().map(|s| s / total_weight);
        let mean = rebuild(base, &mut means);
        match pointer {
            Some(pointer) => {
                *averaged
                    .pointer_mut(pointer)
                    .expect("the answer has the pointer") = mean;
            }
            None => {
                let output = &mut averaged["outputs"][position];
                output["data"] = mean;
                let integer = output["datatype"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("INT") || t.starts_with("UINT"));
                if integer {
                    output["datatype"] = "FP64".into();
                }
            }
        }
    }
    Averaged {
        value: Some(averaged),
        left_out,
    }
}

/// An answer's tensors, by name.
type Tensors<'a> = Vec<(&'a str, &'a Value)>;

/// The tensors of an answer, by name (one unnamed tensor at a pointer).
fn tensors_of<'a>(answer: &'a Value, pointer: Option<&str>) -> Result<Tensors<'a>, String> {
    match pointer {
        Some(pointer) => answer
            .pointer(pointer)
            .map(|tensor| vec![("", tensor)])
            .ok_or_else(|| format!("the answer has nothing at {pointer}")),
        None => {
            let outputs = answer["outputs"]
                .as_array()
                .filter(|o| !o.is_empty())
                .ok_or("the answer has no KServe v2 `outputs`")?;
            outputs
                .iter()
                .map(|o| {
                    let name = o["name"].as_str().ok_or("an output has no name")?;
                    Ok((name, &o["data"]))
                })
                .collect()
        }
    }
}

/// The names and shapes of `tensors`, as text two answers can compare, or
/// why they are not all numbers.
fn signature(tensors: &[(&str, &Value)]) -> Result<String, String> {
    let mut named: Vec<String> = tensors
        .iter()
        .map(|(name, data)| {
            let mut shape = String::new();
            shape_of(data, &mut shape).map_err(|e| match name {
                &"" => e,
                name => format!("output {name:?}: {e}"),
            })?;
            // The name JSON-quoted: names holding `:` or `;` cannot make
            // two different sets of outputs read alike.
            Ok(format!("{}:{shape}", Value::from(*name)))
        })
        .collect::<Result<_, String>>()?;
    named.sort();
    let mut names: Vec<&str> = tensors.iter().map(|(name, _)| *name).collect();
    names.sort_unstable();
    if let Some(twice) = names.windows(2).find(|pair| pair[0] == pair[1]) {
        return Err(format!("two outputs are named {:?}", twice[0]));
    }
    Ok(named.join(";"))
}

/// Appends the nesting of a (nested) array of numbers to `out`.
fn shape_of(value: &Value, out: &mut String) -> Result<(), String> {
    match value {
        Value::Number(_) => {
            out.push('n');
            Ok(())
        }
        Value::Array(items) => {
            out.push('[');
            for item in items {
                shape_of(item, out)?;
            }
            out.push(']');
            Ok(())
        }
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

/// Appends the numbers of a (nested) array whose shape was checked.
fn flatten(value: &Value, out: &mut Vec<f64>) {
    match value {
        Value::Number(n) => out.push(n.as_f64().unwrap_or(0.0)),
        Value::Array(items) => items.iter().for_each(|item| flatten(item, out)),
        _ => {}
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
    fn outputs_whose_names_hold_separators_are_not_confused() {
        // Found with the fanout_combine fuzz target: `:n;a` alone and
        // `""` with `a` made the same signature, and averaging panicked.
        let one = json!({ "outputs": [{ "name": ":n;a", "data": 1 }] });
        let two = json!({ "outputs": [{ "name": "", "data": 2 }, { "name": "a", "data": 3 }] });
        let averaged = mean(&[(&one, 1.0), (&two, 1.0)], None);
        assert!(averaged.value.is_some());
        assert_eq!(
            averaged.left_out.len(),
            1,
            "different outputs, not averaged"
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
        let averaged = mean(&[(&a, 2.0), (&b, 1.0)], None).value.unwrap();
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
        let averaged = mean(&[(&a, 1.0), (&b, 1.0)], Some("/data/0/embedding"))
            .value
            .unwrap();
        assert_eq!(
            averaged,
            json!({ "data": [{ "embedding": [[2.0, 3.0], [4.0, 5.0]] }], "model": "a" })
        );
    }

    #[test]
    fn the_largest_group_of_like_answers_is_averaged_and_the_rest_named() {
        let odd = json!({ "v": [9] });
        let a = json!({ "v": [1, 2], "from": "a" });
        let b = json!({ "v": [3, 4], "from": "b" });
        let text = json!({ "v": ["x", "y"] });
        let missing = json!({ "w": [1, 2] });
        let at = Some("/v");
        // An odd answer listed first does not decide the shape.
        let averaged = mean(&[(&odd, 1.0), (&a, 1.0), (&b, 1.0)], at);
        assert_eq!(
            averaged.value,
            Some(json!({ "v": [2.0, 3.0], "from": "a" }))
        );
        assert_eq!(
            averaged.left_out,
            [Incompatible {
                index: 0,
                reason: "its tensors differ in name or shape from those of the most answers".into()
            }]
        );
        // A tie goes to the group of the earliest answer.
        assert_eq!(mean(&[(&odd, 1.0), (&a, 1.0)], at).left_out[0].index, 1);
        let averaged = mean(&[(&text, 1.0), (&missing, 1.0), (&a, 1.0)], at);
        assert_eq!(
            averaged.value,
            Some(json!({ "v": [1.0, 2.0], "from": "a" }))
        );
        let reasons: Vec<&str> = averaged
            .left_out
            .iter()
            .map(|l| l.reason.as_str())
            .collect();
        assert_eq!(
            reasons,
            [
                "expected numbers, found a string",
                "the answer has nothing at /v"
            ]
        );
        let none = mean(&[(&a, 1.0)], None);
        assert_eq!(none.value, None);
        assert_eq!(
            none.left_out[0].reason,
            "the answer has no KServe v2 `outputs`"
        );
    }
}
