//! JSON-RPC 2.0, sans-IO: one WebSocket text message in (a request, a
//! notification or a batch), typed requests or the error to answer, and
//! the responses out. No sockets here; the fuzz target drives it.

use serde_json::{Map, Value, json};

/// Parse error: the message is not JSON.
pub const PARSE_ERROR: i64 = -32700;
/// Not a valid request object (or an empty batch).
pub const INVALID_REQUEST: i64 = -32600;
/// No such method.
pub const METHOD_NOT_FOUND: i64 = -32601;
/// The params do not fit the method; the message names the field.
pub const INVALID_PARAMS: i64 = -32602;
/// A bug on our side.
pub const INTERNAL_ERROR: i64 = -32603;
/// No token yet, or the token is not (or no longer) valid.
pub const UNAUTHORIZED: i64 = -32001;
/// The caller's token lacks the scope the method needs (`data.scope`).
pub const FORBIDDEN: i64 = -32002;
/// The device, request, action or subscription does not exist.
pub const NOT_FOUND: i64 = -32003;
/// The device's policy denies it (`data.code` holds the reason code).
pub const POLICY_DENIED: i64 = -32004;
/// The pairing request expired.
pub const PAIRING_EXPIRED: i64 = -32010;
/// The code typed is not the one the device shows (`data.attemptsLeft`).
pub const PAIRING_INVALID_CODE: i64 = -32011;
/// The device is paired already.
pub const PAIRING_ALREADY_PAIRED: i64 = -32012;
/// The pairing request was rejected (or voided by wrong codes).
pub const PAIRING_REJECTED: i64 = -32013;
/// The device is not connected, or did not answer in time.
pub const UNAVAILABLE: i64 = -32020;
/// Too many requests, connections or pending pairings: try again later.
pub const BUSY: i64 = -32029;

/// Requests in one batch at most.
pub const MAX_BATCH: usize = 64;
/// Longest method name accepted.
pub const MAX_METHOD_LEN: usize = 64;

/// A request id: a string or an integer (JSON-RPC allows numbers; we take
/// integers), echoed back as given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Id {
    /// A number.
    Num(i64),
    /// A string (at most 128 bytes).
    Str(String),
}

impl Id {
    fn to_json(&self) -> Value {
        match self {
            Id::Num(n) => json!(n),
            Id::Str(s) => json!(s),
        }
    }
}

/// An error to answer with.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcError {
    /// The JSON-RPC code.
    pub code: i64,
    /// A sentence saying what was wrong and what to do.
    pub message: String,
    /// More, per code (the field, the policy's reason code, …).
    pub data: Option<Value>,
}

impl RpcError {
    /// An error with `code` and `message`.
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        let mut message: String = message.into();
        if message.len() > MAX_ERROR_MESSAGE {
            let mut cut = MAX_ERROR_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        RpcError {
            code,
            message,
            data: None,
        }
    }

    /// With `data`.
    pub fn with_data(mut self, data: Value) -> Self {
        self.data = Some(data);
        self
    }

    /// Invalid params, naming `field`.
    pub fn invalid_params(field: &str, message: impl std::fmt::Display) -> Self {
        RpcError::new(
            INVALID_PARAMS,
            format!("invalid params: {field}: {message}"),
        )
        .with_data(json!({ "field": field }))
    }

    fn to_json(&self) -> Value {
        let mut e = Map::new();
        e.insert("code".into(), json!(self.code));
        e.insert("message".into(), json!(self.message));
        if let Some(d) = &self.data {
            e.insert("data".into(), d.clone());
        }
        Value::Object(e)
    }
}

/// One request of a message. (`Debug` leaves out the params: they may
/// hold a token.)
#[derive(Clone, PartialEq)]
pub struct Request {
    /// `None`: a notification (no answer).
    pub id: Option<Id>,
    /// The method's name.
    pub method: String,
    /// Its params: an object (absent params are `{}`).
    pub params: Value,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("id", &self.id)
            .field("method", &self.method)
            .finish_non_exhaustive()
    }
}

/// Longest error message sent back (it may quote what the caller sent).
const MAX_ERROR_MESSAGE: usize = 512;

/// What a message holds: requests, or entries that were not requests and
/// are answered with an error.
#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    /// A request to dispatch.
    Request(Request),
    /// Not a valid request: answered with this (id `null` if none could
    /// be read).
    Invalid(Option<Id>, RpcError),
}

/// A parsed message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// One call.
    Single(Call),
    /// A batch: the answers go back as an array.
    Batch(Vec<Call>),
}

/// Parses one WebSocket text message. `Err`: the whole message is answered
/// with this error (parse error, empty or oversized batch).
pub fn parse(text: &str) -> Result<Message, RpcError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| RpcError::new(PARSE_ERROR, format!("parse error: {e}")))?;
    match value {
        Value::Array(items) => {
            if items.is_empty() {
                return Err(RpcError::new(
                    INVALID_REQUEST,
                    "invalid request: an empty batch",
                ));
            }
            if items.len() > MAX_BATCH {
                return Err(RpcError::new(
                    INVALID_REQUEST,
                    format!(
                        "invalid request: a batch of {} (at most {MAX_BATCH})",
                        items.len()
                    ),
                ));
            }
            Ok(Message::Batch(items.into_iter().map(call).collect()))
        }
        other => Ok(Message::Single(call(other))),
    }
}

fn read_id(obj: &Map<String, Value>) -> Result<Option<Id>, ()> {
    match obj.get("id") {
        None => Ok(None),
        Some(Value::Number(n)) => n.as_i64().map(|n| Some(Id::Num(n))).ok_or(()),
        Some(Value::String(s)) if s.len() <= 128 => Ok(Some(Id::Str(s.clone()))),
        // `null` ids are allowed by the letter of the spec but answer
        // nothing useful; strings too long, floats and other types: refused.
        Some(_) => Err(()),
    }
}

fn call(value: Value) -> Call {
    let invalid = |id, m: &str| {
        Call::Invalid(
            id,
            RpcError::new(INVALID_REQUEST, format!("invalid request: {m}")),
        )
    };
    let Value::Object(mut obj) = value else {
        return invalid(None, "not an object");
    };
    let Ok(id) = read_id(&obj) else {
        return invalid(
            None,
            "\"id\" must be an integer or a string of at most 128 bytes",
        );
    };
    if obj.get("jsonrpc") != Some(&Value::String("2.0".into())) {
        return invalid(id, "\"jsonrpc\" must be \"2.0\"");
    }
    let method = match obj.remove("method") {
        Some(Value::String(m)) if !m.is_empty() && m.len() <= MAX_METHOD_LEN => m,
        Some(Value::String(_)) => return invalid(id, "\"method\" must be 1 to 64 bytes"),
        _ => return invalid(id, "\"method\" must be a string"),
    };
    let params = match obj.remove("params") {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(p @ Value::Object(_)) => p,
        // By-position params: none of our methods take them.
        Some(Value::Array(_)) => {
            return Call::Invalid(
                id,
                RpcError::new(
                    INVALID_PARAMS,
                    "invalid params: pass params as an object of named fields",
                ),
            );
        }
        Some(_) => return invalid(id, "\"params\" must be an object"),
    };
    for key in obj.keys() {
        if !matches!(key.as_str(), "jsonrpc" | "id") {
            return invalid(id, &format!("unknown member {key:?}"));
        }
    }
    Call::Request(Request { id, method, params })
}

/// The response to a request with `id`.
pub fn response(id: Option<&Id>, outcome: Result<Value, RpcError>) -> Value {
    let id = id.map_or(Value::Null, Id::to_json);
    match outcome {
        Ok(result) => json!({ "jsonrpc": "2.0", "id": id, "result": result }),
        Err(e) => json!({ "jsonrpc": "2.0", "id": id, "error": e.to_json() }),
    }
}

/// A notification from the server (`method` and `params`).
pub fn notification(method: &str, params: Value) -> Value {
    json!({ "jsonrpc": "2.0", "method": method, "params": params })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn single(text: &str) -> Call {
        match parse(text).unwrap() {
            Message::Single(c) => c,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn requests_notifications_and_batches() {
        let Call::Request(r) = single(r#"{"jsonrpc":"2.0","id":7,"method":"devices.list"}"#) else {
            panic!()
        };
        assert_eq!(
            (r.id, r.method.as_str(), r.params),
            (Some(Id::Num(7)), "devices.list", json!({}))
        );
        let Call::Request(n) = single(r#"{"jsonrpc":"2.0","method":"x","params":{"a":1}}"#) else {
            panic!()
        };
        assert_eq!((n.id, n.params), (None, json!({"a": 1})));
        let Message::Batch(b) = parse(r#"[{"jsonrpc":"2.0","id":"a","method":"m"}, 5]"#).unwrap()
        else {
            panic!()
        };
        assert!(matches!(&b[0], Call::Request(r) if r.id == Some(Id::Str("a".into()))));
        assert!(matches!(&b[1], Call::Invalid(None, e) if e.code == INVALID_REQUEST));
    }

    #[test]
    fn bad_messages_get_the_right_codes() {
        assert_eq!(parse("{").unwrap_err().code, PARSE_ERROR);
        assert_eq!(parse("[]").unwrap_err().code, INVALID_REQUEST);
        let big = format!(
            "[{}]",
            vec![r#"{"jsonrpc":"2.0","method":"m"}"#; 65].join(",")
        );
        assert_eq!(parse(&big).unwrap_err().code, INVALID_REQUEST);
        for bad in [
            r#"{"id":1,"method":"m"}"#,
            r#"{"jsonrpc":"1.0","id":1,"method":"m"}"#,
            r#"{"jsonrpc":"2.0","id":1}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":""}"#,
            r#"{"jsonrpc":"2.0","id":1.5,"method":"m"}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"m","params":3}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"m","extra":true}"#,
            r#""text""#,
        ] {
            match single(bad) {
                Call::Invalid(_, e) => assert_eq!(e.code, INVALID_REQUEST, "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        match single(r#"{"jsonrpc":"2.0","id":2,"method":"m","params":[1]}"#) {
            Call::Invalid(Some(Id::Num(2)), e) => assert_eq!(e.code, INVALID_PARAMS),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn responses_echo_the_id() {
        let ok = response(Some(&Id::Str("x".into())), Ok(json!({"a": 1})));
        assert_eq!(ok, json!({"jsonrpc": "2.0", "id": "x", "result": {"a": 1}}));
        let err = response(None, Err(RpcError::invalid_params("deviceId", "missing")));
        assert_eq!(err["id"], Value::Null);
        assert_eq!(err["error"]["code"], json!(INVALID_PARAMS));
        assert_eq!(err["error"]["data"]["field"], json!("deviceId"));
    }
}
