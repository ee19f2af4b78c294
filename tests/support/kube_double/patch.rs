//! JSON merge patch (RFC 7386) and JSON patch (RFC 6902).

use serde_json::{Map, Value};

/// RFC 7386: objects merge recursively, `null` removes a key, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let target = target.as_object_mut().expect("just made an object");
    for (k, v) in patch {
        if v.is_null() {
            target.remove(k);
        } else {
            merge_patch(target.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// RFC 6902 operations `add`, `remove`, `replace`, `test`, `move`, `copy`, applied in order.
/// On error the document may be partly patched: callers patch a copy.
pub fn json_patch(doc: &mut Value, ops: &Value) -> Result<(), String> {
    let ops = ops.as_array().ok_or("a JSON patch must be an array")?;
    for op in ops {
        let ptr = |field: &str| tokens(op[field].as_str().ok_or(format!("{op}: missing {field}"))?);
        let value = || {
            op.get("value")
                .cloned()
                .ok_or(format!("{op}: missing value"))
        };
        match op["op"].as_str().unwrap_or("") {
            "add" => add(doc, &ptr("path")?, value()?)?,
            "remove" => drop(remove(doc, &ptr("path")?)?),
            "replace" => {
                let path = ptr("path")?;
                *get_mut(doc, &path).ok_or(format!("{op}: path does not exist"))? = value()?;
            }
            "test" => {
                if get(doc, &ptr("path")?) != Some(&value()?) {
                    return Err(format!("test operation failed: {op}"));
                }
            }
            "move" => {
                let moved = remove(doc, &ptr("from")?)?;
                add(doc, &ptr("path")?, moved)?;
            }
            "copy" => {
                let copied = get(doc, &ptr("from")?)
                    .cloned()
                    .ok_or(format!("{op}: from does not exist"))?;
                add(doc, &ptr("path")?, copied)?;
            }
            other => return Err(format!("unsupported JSON patch operation {other:?}")),
        }
    }
    Ok(())
}

fn tokens(ptr: &str) -> Result<Vec<String>, String> {
    if ptr.is_empty() {
        return Ok(Vec::new());
    }
    let rest = ptr
        .strip_prefix('/')
        .ok_or(format!("invalid JSON pointer {ptr:?}"))?;
    Ok(rest
        .split('/')
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect())
}

fn get<'a>(doc: &'a Value, toks: &[String]) -> Option<&'a Value> {
    toks.iter().try_fold(doc, |v, t| match v {
        Value::Object(m) => m.get(t),
        Value::Array(a) => a.get(t.parse::<usize>().ok()?),
        _ => None,
    })
}

fn get_mut<'a>(doc: &'a mut Value, toks: &[String]) -> Option<&'a mut Value> {
    toks.iter().try_fold(doc, |v, t| match v {
        Value::Object(m) => m.get_mut(t),
        Value::Array(a) => a.get_mut(t.parse::<usize>().ok()?),
        _ => None,
    })
}

fn add(doc: &mut Value, toks: &[String], value: Value) -> Result<(), String> {
    let Some((last, parent)) = toks.split_last() else {
        *doc = value;
        return Ok(());
    };
    match get_mut(doc, parent) {
        Some(Value::Object(m)) => {
            m.insert(last.clone(), value);
        }
        Some(Value::Array(a)) => {
            let i = if last == "-" {
                a.len()
            } else {
                last.parse().map_err(|_| format!("bad index {last}"))?
            };
            if i > a.len() {
                return Err(format!("index {i} out of bounds"));
            }
            a.insert(i, value);
        }
        _ => return Err(format!("parent of /{} does not exist", toks.join("/"))),
    }
    Ok(())
}

fn remove(doc: &mut Value, toks: &[String]) -> Result<Value, String> {
    let missing = || format!("path /{} does not exist", toks.join("/"));
    let (last, parent) = toks
        .split_last()
        .ok_or("cannot remove the whole document")?;
    match get_mut(doc, parent) {
        Some(Value::Object(m)) => m.remove(last).ok_or_else(missing),
        Some(Value::Array(a)) => match last.parse::<usize>() {
            Ok(i) if i < a.len() => Ok(a.remove(i)),
            _ => Err(missing()),
        },
        _ => Err(missing()),
    }
}
