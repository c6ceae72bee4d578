//! Tests of the expression language: syntax, operators, functions, errors, folding, limits.

use std::borrow::Cow;

use super::compile::{self, Code};
use super::*;

fn j(text: &str) -> Value {
    serde_json::from_str(text).expect("test JSON")
}

/// The record most tests evaluate against.
fn rec() -> Record {
    let value = j(r#"{
        "user": "Ann", "n": 7, "f": 2.5, "words": " the quick  brown\tfox ",
        "tags": ["a", "b", "c"], "nested": {"x": {"y": 42}}, "some key": "sk",
        "nul": null, "s": "  Hi There  ", "big": 9223372036854775807
    }"#);
    Record::keyed(Value::str("k1"), 1_000, value)
}

fn compile_ok(src: &str) -> Expr {
    Expr::compile(src).unwrap_or_else(|e| panic!("{src:?} failed to compile: {e}"))
}

fn ev_on(src: &str, r: &Record) -> Value {
    compile_ok(src)
        .eval(r)
        .unwrap_or_else(|e| panic!("{src:?} failed: {e}"))
}

fn ev(src: &str) -> Value {
    ev_on(src, &rec())
}

fn ev_err(src: &str) -> EvalError {
    match compile_ok(src).eval(&rec()) {
        Ok(v) => panic!("{src:?} gave {v}, expected an error"),
        Err(e) => *e,
    }
}

fn cerr(src: &str) -> ExprError {
    match Expr::compile(src) {
        Ok(_) => panic!("{src:?} compiled, expected an error"),
        Err(e) => e,
    }
}

/// Asserts `src` evaluates to the JSON `expected` (by Value equality, so 1 == 1.0).
#[track_caller]
fn check(src: &str, expected: &str) {
    assert_eq!(ev(src), j(expected), "{src}");
}

#[track_caller]
fn check_int(src: &str, expected: i64) {
    match ev(src) {
        Value::Int(i) => assert_eq!(i, expected, "{src}"),
        other => panic!(
            "{src:?} gave {other:?} ({}), expected int",
            other.type_name()
        ),
    }
}

#[track_caller]
fn check_float(src: &str, expected: f64) {
    match ev(src) {
        Value::Float(f) => assert_eq!(f, expected, "{src}"),
        other => panic!(
            "{src:?} gave {other:?} ({}), expected float",
            other.type_name()
        ),
    }
}

#[track_caller]
fn check_err(src: &str, expected: EvalError) {
    assert_eq!(ev_err(src), expected, "{src}");
}

#[track_caller]
fn check_cerr(src: &str, column: usize, needle: &str) {
    let e = cerr(src);
    assert_eq!(e.column, column, "{src}: {e}");
    assert!(
        e.message.contains(needle),
        "{src}: {e:?} does not mention {needle:?}"
    );
}

fn bad_arg(func: &'static str, expected: &'static str, got: &'static str) -> EvalError {
    EvalError::BadArg {
        func,
        expected,
        got,
    }
}

fn bad_ops(op: &'static str, left: &'static str, right: &'static str) -> EvalError {
    EvalError::BadOperands { op, left, right }
}

fn compiled(src: &str) -> Code {
    let ast = super::parser::parse(src).expect("parses");
    compile::compile(&ast, &compile::Budget::new(MAX_EVAL_BYTES)).expect("compiles")
}

#[test]
fn expr_is_send_sync_clone_and_debug_prints_source() {
    fn assert_traits<T: Send + Sync + Clone + 'static>() {}
    assert_traits::<Expr>();
    let e = compile_ok("value.n + 1");
    let e2 = e.clone();
    assert_eq!(e2.source(), "value.n + 1");
    assert_eq!(format!("{e:?}"), r#"Expr("value.n + 1")"#);
    assert_eq!(e2.eval(&rec()), Ok(Value::Int(8)));
}

#[test]
fn literals() {
    check_int("42", 42);
    check_int("-3", -3);
    check_int("007", 7);
    check_int("-9223372036854775808", i64::MIN);
    check_int("9223372036854775807", i64::MAX);
    check_float("1.5", 1.5);
    check_float("2e3", 2000.0);
    check_float("2E+3", 2000.0);
    check_float("1.5e-3", 0.0015);
    check("true", "true");
    check("false", "false");
    check("null", "null");
    check(r#""double""#, r#""double""#);
    check("'single'", r#""single""#);
    check(r#"'a\nb\tc\\d\'e\"f'"#, r#""a\nb\tc\\d'e\"f""#);
    check(r#""\r\0""#, r#""\r\u0000""#);
    check(r#""\u{e9}\u{1F600}""#, r#""é😀""#);
    check(r#"'it"s'"#, r#""it\"s""#);
    check("''", r#""""#);
    check("[]", "[]");
    check("[1, 'two', [3], value.n]", r#"[1, "two", [3], 7]"#);
    check("[1, 2,]", "[1, 2]");
    check("{}", "{}");
    check(
        r#"{word: value.user, "n": 1, 'q k': null,}"#,
        r#"{"word":"Ann","n":1,"q k":null}"#,
    );
    check(
        "{true: 1, in: 2, value: 3}",
        r#"{"true":1,"in":2,"value":3}"#,
    );
    check("{b: 1, a: {c: [2]}}", r#"{"a":{"c":[2]},"b":1}"#);
}

#[test]
fn variables() {
    let r = rec();
    assert_eq!(ev_on("value", &r), r.value);
    check("key", r#""k1""#);
    check_int("ts", 1_000);
    let unkeyed = Record::new(5, Value::Int(3));
    assert_eq!(ev_on("key", &unkeyed), Value::Null);
    assert_eq!(ev_on("key == null", &unkeyed), Value::Bool(true));
    assert_eq!(ev_on("value * 2 + ts", &unkeyed), Value::Int(11));
}

#[test]
fn field_and_index_access() {
    check("value.user", r#""Ann""#);
    check("value.nested.x.y", "42");
    check("value.nested['x'][\"y\"]", "42");
    check(r#"value["some key"]"#, r#""sk""#);
    check("value.tags[0]", r#""a""#);
    check("value.tags[2]", r#""c""#);
    check("value.tags[-1]", r#""c""#);
    check("value.tags[-3]", r#""a""#);
    check("value.tags[3]", "null");
    check("value.tags[-4]", "null");
    check("value.tags[-9223372036854775808]", "null");
    check("value.tags[value.n - 6]", r#""b""#);
    check("value['ta' + 'gs'][1]", r#""b""#);
    check("value.missing", "null");
    check("value.missing.deeper[3].x", "null");
    check("value.nul.x", "null");
    check("value.true", "null");
    check("{a: {b: 5}}.a.b", "5");
    check("[10, 20][1]", "20");
    check(r#"json_parse('{"a":{"b":[1,2]}}').a.b[-1]"#, "2");
    check("(value.n > 1 ? value.nested : null).x.y", "42");
    let unkeyed = Record::new(0, Value::Null);
    assert_eq!(ev_on("key.a[0]", &unkeyed), Value::Null);
    assert_eq!(ev_on("value.a.b", &unkeyed), Value::Null);
    // Errors: field access on a non-map, index of the wrong type.
    check_err("value.n.x", EvalError::FieldAccess { on: "int" });
    check_err("value.tags.x", EvalError::FieldAccess { on: "list" });
    check_err("ts.x", EvalError::FieldAccess { on: "int" });
    check_err("'s'.x", EvalError::FieldAccess { on: "string" });
    check_err(
        "value.tags['a']",
        EvalError::BadIndex {
            on: "list",
            index: "string",
        },
    );
    check_err(
        "value[0]",
        EvalError::BadIndex {
            on: "map",
            index: "int",
        },
    );
    check_err(
        "value.tags[1.0]",
        EvalError::BadIndex {
            on: "list",
            index: "float",
        },
    );
    check_err(
        "value.user[0]",
        EvalError::BadIndex {
            on: "string",
            index: "int",
        },
    );
    check_err(
        "[1][value.user]",
        EvalError::BadIndex {
            on: "list",
            index: "string",
        },
    );
    assert_eq!(ev_err("value.n.x").to_string(), "field access on int");
}

#[test]
fn arithmetic() {
    check_int("1 + 2", 3);
    check_int("value.n + 1", 8);
    check_int("10 - 4", 6);
    check_int("value.n * 6", 42);
    check_int("7 / 2", 3);
    check_int("-7 / 2", -3);
    check_int("7 % 3", 1);
    check_int("-7 % 3", -1);
    check_float("7.0 / 2", 3.5);
    check_float("7 / 2.0", 3.5);
    check_float("1 + 1.5", 2.5);
    check_float("value.f * 2", 5.0);
    check_float("value.f - 0.5", 2.0);
    check_float("7.5 % 2", 1.5);
    check_int("-value.n", -7);
    check_float("-value.f", -2.5);
    check_int("--3", 3);
    assert_eq!(ev("1.0 / 0"), Value::Float(f64::INFINITY));
    check(r#""foo" + 'bar'"#, r#""foobar""#);
    check("value.user + '!'", r#""Ann!""#);
    check("[1, 2] + [3]", "[1, 2, 3]");
    check("value.tags + []", r#"["a", "b", "c"]"#);
}

#[test]
fn comparisons_and_logic() {
    check("1 < 2", "true");
    check("2 < 2", "false");
    check("2 <= 2", "true");
    check("3 > 2", "true");
    check("2 >= 3", "false");
    check("1 == 1.0", "true");
    // Exact across int and float, beyond a float's 53 bits (2^53 + 1 against 2^53).
    check("9007199254740993 > 9007199254740992.0", "true");
    check("9007199254740992 == 9007199254740992.0", "true");
    check("1 != 2", "true");
    check("'a' < 'b'", "true");
    check("'a' == \"a\"", "true");
    check("[1, 2] == [1, 2]", "true");
    check("{a: 1} == {a: 1.0}", "true");
    check("null < false", "true"); // total order across types
    check("value.nul == null", "true");
    check("value.missing == null", "true");
    check("ts >= 1000", "true");
    check("key == 'k1'", "true");
    check("2 in [1, 2]", "true");
    check("3 in value.tags", "false");
    check("'b' in value.tags", "true");
    check("'ell' in 'hello'", "true");
    check("'user' in value", "true");
    check("'nope' in value", "false");
    check("!true", "false");
    check("!(1 > 2)", "true");
    check("true && true", "true");
    check("true && false", "false");
    check("false || true", "true");
    check("false || false", "false");
    check("value.n > 5 && value.user == 'Ann'", "true");
}

#[test]
fn precedence() {
    check_int("1 + 2 * 3", 7);
    check_int("(1 + 2) * 3", 9);
    check_int("10 - 4 - 3", 3);
    check_int("100 / 10 / 5", 2);
    check_int("2 * 3 % 4", 2);
    check_int("1 + 7 % 3", 2);
    check_int("-2 * 3", -6);
    check_int("- 2 + 5", 3);
    check("1 + 2 < 4", "true");
    check("1 < 2 == 2 < 3", "true");
    check("1 < 2 == true", "true");
    check("!false == true", "true");
    check("true || false && false", "true");
    check("(true || false) && false", "false");
    check("false && true || true", "true");
    check("1 == 1 && 2 != 3", "true");
    // `in` binds looser than equality and tighter than `&&`.
    check("'a' in ['a'] && true", "true");
    check("true == true in [true]", "true");
    check_err("1 in [1] == true", bad_ops("in", "int", "bool"));
    // The conditional binds loosest and is right-associative.
    check_int("true ? 1 : 2", 1);
    check_int("false ? 1 : 2", 2);
    check_int("1 > 2 ? 10 : 1 + 2", 3);
    check_int("false ? 1 : true ? 2 : 3", 2);
    check_int("true ? false ? 1 : 2 : 3", 2);
    check("value.n > 5 || false ? 'big' : 'small'", r#""big""#);
    check_int("-value.nested.x.y", -42);
}

#[test]
fn runtime_errors() {
    let cases: &[(&str, EvalError, &str)] = &[
        (
            "'a' + 1",
            bad_ops("+", "string", "int"),
            "cannot apply '+' to string and int",
        ),
        (
            "value.user - 1",
            bad_ops("-", "string", "int"),
            "cannot apply '-' to string and int",
        ),
        (
            "null * 2",
            bad_ops("*", "null", "int"),
            "cannot apply '*' to null and int",
        ),
        (
            "[1] / 2",
            bad_ops("/", "list", "int"),
            "cannot apply '/' to list and int",
        ),
        (
            "true % 2",
            bad_ops("%", "bool", "int"),
            "cannot apply '%' to bool and int",
        ),
        (
            "1 in 2",
            bad_ops("in", "int", "int"),
            "cannot apply 'in' to int and int",
        ),
        (
            "1 in 'abc'",
            bad_ops("in", "int", "string"),
            "cannot apply 'in' to int and string",
        ),
        (
            "1 in value",
            bad_ops("in", "int", "map"),
            "cannot apply 'in' to int and map",
        ),
        ("1 / 0", EvalError::DivisionByZero, "division by zero"),
        (
            "value.n / (ts - 1000)",
            EvalError::DivisionByZero,
            "division by zero",
        ),
        ("value.n % 0", EvalError::DivisionByZero, "division by zero"),
        (
            "value.big + 1",
            EvalError::Overflow { op: "+" },
            "integer overflow in '+'",
        ),
        (
            "-value.big - 2",
            EvalError::Overflow { op: "-" },
            "integer overflow in '-'",
        ),
        (
            "value.big * 2",
            EvalError::Overflow { op: "*" },
            "integer overflow in '*'",
        ),
        (
            "(-value.big - 1) / -1",
            EvalError::Overflow { op: "/" },
            "integer overflow in '/'",
        ),
        (
            "(-value.big - 1) % -1",
            EvalError::Overflow { op: "%" },
            "integer overflow in '%'",
        ),
        (
            "-(-value.big - 1)",
            EvalError::Overflow { op: "-" },
            "integer overflow in '-'",
        ),
        (
            "-'a'",
            EvalError::BadOperand {
                op: "-",
                operand: "string",
            },
            "cannot apply '-' to string",
        ),
        (
            "!1",
            EvalError::BadOperand {
                op: "!",
                operand: "int",
            },
            "cannot apply '!' to int",
        ),
        (
            "1 && true",
            EvalError::NotBool {
                op: "&&",
                got: "int",
            },
            "'&&' expects a bool, got int",
        ),
        (
            "true && 1",
            EvalError::NotBool {
                op: "&&",
                got: "int",
            },
            "'&&' expects a bool, got int",
        ),
        (
            "value.n || true",
            EvalError::NotBool {
                op: "||",
                got: "int",
            },
            "'||' expects a bool, got int",
        ),
        (
            "false || null",
            EvalError::NotBool {
                op: "||",
                got: "null",
            },
            "'||' expects a bool, got null",
        ),
        (
            "value.n ? 1 : 2",
            EvalError::NotBool {
                op: "?:",
                got: "int",
            },
            "'?:' expects a bool, got int",
        ),
        (
            "split(1, ',')",
            bad_arg("split", "a string", "int"),
            "split() expects a string, got int",
        ),
    ];
    for (src, err, text) in cases {
        let got = ev_err(src);
        assert_eq!(&got, err, "{src}");
        assert_eq!(got.to_string(), *text, "{src}");
    }
}

#[test]
fn short_circuit_and_laziness() {
    check("false && (1 / 0 == 1)", "false");
    check("true || (1 / 0 == 1)", "true");
    check("value.n > 100 && (1 / 0 == 1)", "false");
    check("value.n < 100 || value.n.x", "true");
    check("value.n > 100 && value.n.x", "false");
    check_int("true ? 1 : 1 / 0", 1);
    check_int("value.n > 1 ? 1 : value.n.x", 1);
    check_int("if(false, 1 / 0, 2)", 2);
    check_int("if(value.n < 1, value.n.x, 2)", 2);
    check_int("coalesce(1, 1 / 0)", 1);
    check_int("coalesce(value.n, value.n.x)", 7);
    // The error does show when the branch is taken.
    check_err("true && (1 / 0 == 1)", EvalError::DivisionByZero);
    check_err(
        "value.n > 1 ? value.n.x : 0",
        EvalError::FieldAccess { on: "int" },
    );
}

#[test]
fn string_functions() {
    check("split('a,b,,c', ',')", r#"["a","b","","c"]"#);
    check("split('', ',')", r#"[""]"#);
    check("split('héj', '')", r#"["h","é","j"]"#);
    check_err("split(1, ',')", bad_arg("split", "a string", "int"));
    check_err("split('a', null)", bad_arg("split", "a string", "null"));
    check("words(value.words)", r#"["the","quick","brown","fox"]"#);
    check("words('   ')", "[]");
    check_err("words(1)", bad_arg("words", "a string", "int"));
    check("lower('AbC')", r#""abc""#);
    check("lower('ÀÉ x')", r#""àé x""#);
    check("lower('abc')", r#""abc""#);
    check_err("lower(1)", bad_arg("lower", "a string", "int"));
    check("upper('abc')", r#""ABC""#);
    check("upper('straße')", r#""STRASSE""#);
    check_err("upper(null)", bad_arg("upper", "a string", "null"));
    check("trim(value.s)", r#""Hi There""#);
    check("trim('x')", r#""x""#);
    check_err("trim([])", bad_arg("trim", "a string", "list"));
    check("contains('hello', 'ell')", "true");
    check("contains('hello', 'xyz')", "false");
    check("contains(value.tags, 'b')", "true");
    check("contains([1, 2], 2.0)", "true");
    check("contains([1, 2], 3)", "false");
    check_err(
        "contains(1, 1)",
        bad_arg("contains", "a string or list", "int"),
    );
    check_err(
        "contains('a', 1)",
        bad_arg("contains", "a string to look for in a string", "int"),
    );
    check("starts_with('hello', 'he')", "true");
    check("starts_with('hello', 'lo')", "false");
    check_err(
        "starts_with(1, 'a')",
        bad_arg("starts_with", "a string", "int"),
    );
    check("ends_with('hello', 'lo')", "true");
    check("ends_with('hello', 'he')", "false");
    check_err("ends_with('a', 1)", bad_arg("ends_with", "a string", "int"));
    check("replace('a-b-c', '-', '+')", r#""a+b+c""#);
    check("replace('a-b-c', '-', '')", r#""abc""#);
    check("replace('aaa', 'a', 'bb')", r#""bbbbbb""#);
    check("replace('abc', 'x', 'y')", r#""abc""#);
    check("replace('abc', '', 'y')", r#""abc""#);
    check_err(
        "replace(1, 'a', 'b')",
        bad_arg("replace", "a string", "int"),
    );
    check_err(
        "replace('a', 'a', 2)",
        bad_arg("replace", "a string", "int"),
    );
    check("substr('hello', 1, 3)", r#""ell""#);
    check("substr('hello', 1)", r#""ello""#);
    check("substr('héllo', 1, 2)", r#""él""#);
    check("substr('héllo', -3)", r#""llo""#);
    check("substr('hello', -10, 2)", r#""he""#);
    check("substr('hello', 10)", r#""""#);
    check("substr('hello', 2, 100)", r#""llo""#);
    check("substr('hello', 1, -1)", r#""""#);
    check(
        "substr('hello', -9223372036854775808, 9223372036854775807)",
        r#""hello""#,
    );
    check_err("substr(1, 0)", bad_arg("substr", "a string", "int"));
    check_err("substr('a', '0')", bad_arg("substr", "an int", "string"));
    check_err("substr('a', 0, 1.5)", bad_arg("substr", "an int", "float"));
    check(
        "concat('a', 1, null, [1, 'x'], {k: true}, 2.5, 'b')",
        r#""a1null[1,\"x\"]{\"k\":true}2.5b""#,
    );
    check("concat(value.user)", r#""Ann""#);
    check("concat('a', 'b', 'c', 'd', 'e', 'f')", r#""abcdef""#);
    check("string('a')", r#""a""#);
    check("string(1)", r#""1""#);
    check("string(null)", r#""null""#);
    check("string({a: [1, 'x']})", r#""{\"a\":[1,\"x\"]}""#);
    check("len('héllo')", "5");
    check("len(value.tags)", "3");
    check("len({a: 1})", "1");
    check("len('')", "0");
    assert_eq!(
        ev_on(
            "len(value)",
            &Record::new(0, Value::Bytes(vec![1u8, 2, 3].into()))
        ),
        Value::Int(3)
    );
    check_err(
        "len(1)",
        bad_arg("len", "a string, list, map or bytes", "int"),
    );
    check_err(
        "len(null)",
        bad_arg("len", "a string, list, map or bytes", "null"),
    );
}

#[test]
fn replace_result_is_size_capped() {
    let value = Value::map([
        ("s", Value::str(&"a".repeat(1 << 20))),
        ("to", Value::str(&"x".repeat(100))),
    ]);
    let r = Record::new(0, value);
    let e = compile_ok("replace(value.s, 'a', value.to)").eval(&r);
    assert_eq!(e, Err(Box::new(EvalError::TooLarge { op: "replace()" })));
    assert_eq!(
        EvalError::TooLarge { op: "replace()" }.to_string(),
        "replace() would build a string above 64 MiB (json_parse(): read more than 4 MiB)"
    );
    // Large but within the limit works.
    let v = compile_ok("len(replace(value.s, 'a', 'bb'))").eval(&r);
    assert_eq!(v, Ok(Value::Int(2 << 20)));
}

#[test]
fn conversion_functions() {
    check_int("int(5)", 5);
    check_int("int(3.9)", 3);
    check_int("int(-3.9)", -3);
    check_int("int(true)", 1);
    check_int("int(false)", 0);
    check_int("int(' 42 ')", 42);
    check_int("int('-7')", -7);
    check_int("int('3.7')", 3);
    check_int("int('1e3')", 1000);
    check_err("int('abc')", EvalError::InvalidNumber { func: "int" });
    check_err("int('')", EvalError::InvalidNumber { func: "int" });
    check_err("int('nan')", EvalError::InvalidNumber { func: "int" });
    check_err(
        "int(null)",
        bad_arg("int", "a number, bool or numeric string", "null"),
    );
    check_err("int(1e300)", EvalError::IntRange { func: "int" });
    check_err("int('1e300')", EvalError::IntRange { func: "int" });
    assert_eq!(
        ev_err("int('x')").to_string(),
        "int() cannot parse the string as a number"
    );
    check_float("float(1)", 1.0);
    check_float("float(2.5)", 2.5);
    check_float("float(' 2.5 ')", 2.5);
    check_float("float('3')", 3.0);
    check_float("float(true)", 1.0);
    check_err("float('x')", EvalError::InvalidNumber { func: "float" });
    check_err("float('inf')", EvalError::InvalidNumber { func: "float" });
    check_err(
        "float([])",
        bad_arg("float", "a number, bool or numeric string", "list"),
    );
    check("to_json({b: 1, a: 'x'})", r#""{\"a\":\"x\",\"b\":1}""#);
    check("to_json('s')", r#""\"s\"""#);
    check("to_json(null)", r#""null""#);
    check(
        r#"json_parse('{"a": [1, 2.5, "x", null, true]}')"#,
        r#"{"a":[1,2.5,"x",null,true]}"#,
    );
    check("json_parse('3')", "3");
    check("json_parse(to_json(value)) == value", "true");
    check_err("json_parse('{')", EvalError::InvalidJson);
    check_err("json_parse('')", EvalError::InvalidJson);
    check_err("json_parse(1)", bad_arg("json_parse", "a string", "int"));
    // serde_json's recursion limit turns absurd nesting into an error, not a stack overflow.
    let deep = format!("json_parse('{}{}')", "[".repeat(5000), "]".repeat(5000));
    check_err(&deep, EvalError::InvalidJson);
    check("type_of(null)", r#""null""#);
    check("type_of(true)", r#""bool""#);
    check("type_of(1)", r#""int""#);
    check("type_of(1.5)", r#""float""#);
    check("type_of('')", r#""string""#);
    check("type_of([])", r#""list""#);
    check("type_of(value)", r#""map""#);
    assert_eq!(
        ev_on(
            "type_of(value)",
            &Record::new(0, Value::Bytes(vec![1u8].into()))
        ),
        Value::str("bytes")
    );
}

#[test]
fn numeric_functions() {
    let h = |v: Value| Value::Int((v.stable_hash() & (i64::MAX as u64)) as i64);
    assert_eq!(ev("hash('a')"), h(Value::str("a")));
    assert_eq!(ev("hash(value)"), h(rec().value));
    check("hash(1) == hash(1.0)", "true");
    check("hash('a') != hash('b')", "true");
    for i in 0..200 {
        let v = ev(&format!("hash({i})"));
        assert!(matches!(v, Value::Int(x) if x >= 0), "{v:?}");
    }
    check_int("abs(-3)", 3);
    check_int("abs(3)", 3);
    check_float("abs(-2.5)", 2.5);
    check_err("abs('a')", bad_arg("abs", "a number", "string"));
    check_err("abs(-value.big - 1)", EvalError::Overflow { op: "abs()" });
    check_int("min(3, 1, 2)", 1);
    check_int("max(3, 1, 2)", 3);
    check_int("max(3, 1.5)", 3);
    check_float("min(3, 1.5)", 1.5);
    check_int("min(1, 1.0)", 1);
    check("min('b', 'a', 'c')", r#""a""#);
    check("max('b', 'a', 'c')", r#""c""#);
    check_int("max(7)", 7);
    check_int("max(1, 2, 3, 4, 5, 6, value.n, 0)", 7);
    check_err(
        "min(1, 'a')",
        EvalError::Incomparable {
            func: "min",
            left: "int",
            right: "string",
        },
    );
    check_err("max(null, 1)", bad_arg("max", "numbers or strings", "null"));
    assert_eq!(
        ev_err("min(1, 'a')").to_string(),
        "min() cannot compare int and string"
    );
    check_int("floor(2.7)", 2);
    check_int("floor(-2.5)", -3);
    check_int("floor(4)", 4);
    check_int("ceil(2.1)", 3);
    check_int("ceil(-2.1)", -2);
    check_int("round(2.5)", 3);
    check_int("round(-2.5)", -3);
    check_int("round(2.4)", 2);
    check_int("round(7)", 7);
    check_err("floor('a')", bad_arg("floor", "a number", "string"));
    check_err("ceil(null)", bad_arg("ceil", "a number", "null"));
    check_err("round(1e300)", EvalError::IntRange { func: "round" });
    check_err("floor(0.0 / 0)", EvalError::IntRange { func: "floor" });
    check_float("sqrt(16)", 4.0);
    check_float("sqrt(2.25)", 1.5);
    check_err("sqrt('x')", bad_arg("sqrt", "a number", "string"));
    check("range(3)", "[0, 1, 2]");
    check("range(0)", "[]");
    check("range(-5)", "[]");
    check_int("len(range(1000000))", 1_000_000);
    check_err("range(1000001)", EvalError::RangeTooLarge);
    check_err("range('3')", bad_arg("range", "an int", "string"));
    check_int("bucket(17, 5)", 15);
    check_int("bucket(15, 5)", 15);
    check_int("bucket(-3, 5)", -5);
    check_int("bucket(-5, 5)", -5);
    check_int("bucket(5, -2)", 6);
    check_int("bucket(ts + 999, 1000)", 1_000);
    check_float("bucket(7.5, 2)", 6.0);
    check_float("bucket(-0.5, 2)", -2.0);
    check_err("bucket('a', 1)", bad_arg("bucket", "numbers", "string"));
    check_err("bucket(1, null)", bad_arg("bucket", "numbers", "null"));
    check_err("bucket(1, 0)", EvalError::DivisionByZero);
    check_err("bucket(1.5, 0)", EvalError::DivisionByZero);
    check_err(
        "bucket(-value.big - 1, -1)",
        EvalError::Overflow { op: "bucket()" },
    );
}

#[test]
fn collection_and_control_functions() {
    check_int("coalesce(null, value.missing, 3, 4)", 3);
    check("coalesce(null)", "null");
    check("coalesce(value.nul, value.user)", r#""Ann""#);
    check("keys({b: 1, a: 2})", r#"["a", "b"]"#);
    check("keys({})", "[]");
    check_err("keys([1])", bad_arg("keys", "a map", "list"));
    check_int("get(value, 'n', 0)", 7);
    check_int("get(value, 'missing', 0)", 0);
    check_int("get(value, 'nul', 5)", 5);
    check_int("get(value.missing, 'x', 1)", 1);
    check_int("get([1, 2], 1, 0)", 2);
    check_int("get([1, 2], -1, 0)", 2);
    check_int("get([1], 5, 0)", 0);
    check_err(
        "get(1, 'a', 0)",
        bad_arg("get", "a map, list or null", "int"),
    );
    check_err(
        "get({}, 1, 0)",
        bad_arg("get", "a string field name for a map", "int"),
    );
    check_err(
        "get([], 'a', 0)",
        bad_arg("get", "an int index for a list", "string"),
    );
    check_int("if(true, 1, 2)", 1);
    check("if(value.n > 5, 'big', 'small')", r#""big""#);
    check("if(value.n > 50, 'big', 'small')", r#""small""#);
    check_err(
        "if(1, 2, 3)",
        EvalError::NotBool {
            op: "if()",
            got: "int",
        },
    );
    check_err(
        "if(value.n, 2, 3)",
        EvalError::NotBool {
            op: "if()",
            got: "int",
        },
    );
}

#[test]
fn compile_errors_name_the_problem_and_column() {
    check_cerr("foo(1)", 1, "unknown function 'foo'");
    check_cerr("value.n + nope(1)", 11, "unknown function 'nope'");
    check_cerr(
        "split('a')",
        1,
        "function 'split' expects 2 arguments, got 1",
    );
    check_cerr(
        "1 + lower()",
        5,
        "function 'lower' expects 1 argument, got 0",
    );
    check_cerr(
        "substr('a')",
        1,
        "function 'substr' expects 2 or 3 arguments, got 1",
    );
    check_cerr(
        "concat()",
        1,
        "function 'concat' expects at least 1 argument, got 0",
    );
    check_cerr("if(true, 1)", 1, "function 'if' expects 3 arguments, got 2");
    check_cerr("coalesce()", 1, "'coalesce' expects at least 1 argument");
    check_cerr("1 + bar", 5, "unknown variable 'bar'");
    check_cerr("values", 1, "unknown variable 'values'");
    check_cerr("lower", 1, "'lower' is a function");
    check_cerr(r#""abc"#, 1, "unterminated string");
    check_cerr("1 + 'abc", 5, "unterminated string");
    check_cerr(r#""ab\"#, 1, "unterminated string");
    check_cerr(r#""a\qb""#, 3, "unknown escape '\\q'");
    check_cerr(r#""\u{zz}""#, 2, "invalid unicode escape");
    check_cerr(r#""\u{110000}""#, 2, "invalid unicode escape");
    check_cerr("1 + * 2", 5, "expected an expression, found '*'");
    check_cerr("(1 + 2", 7, "expected ')'");
    check_cerr("(1 + 2", 7, "end of input");
    check_cerr("[1, 2", 6, "expected ',' or ']'");
    check_cerr("{a 1}", 4, "expected ':'");
    check_cerr("{1: 2}", 2, "expected a map key");
    check_cerr("{a: 1, a: 2}", 8, "duplicate map key \"a\"");
    check_cerr("f(1 2)", 5, "expected ',' or ')'");
    check_cerr(
        "1 2",
        3,
        "unexpected number 2 after the end of the expression",
    );
    check_cerr("value.n )", 9, "unexpected ')'");
    check_cerr("value.x(1)", 8, "unexpected '('");
    check_cerr("", 1, "expected an expression, found end of input");
    check_cerr("   ", 4, "end of input");
    check_cerr("1 +", 4, "end of input");
    check_cerr("value.", 7, "expected a field name");
    check_cerr("value.1", 7, "expected a field name");
    check_cerr("1 = 2", 3, "did you mean '=='");
    check_cerr("a & b", 3, "did you mean '&&'");
    check_cerr("true | false", 6, "did you mean '||'");
    check_cerr("1 + #", 5, "unexpected character '#'");
    check_cerr("'é' + ~", 7, "unexpected character '~'"); // columns count chars, not bytes
    check_cerr("9223372036854775808", 1, "out of range");
    check_cerr("1 + 99999999999999999999", 5, "out of range");
    check_cerr("1e999", 1, "out of range");
    check_cerr("2e", 1, "exponent");
    check_cerr("true ? 1", 9, "expected ':'");
    let e = cerr("1 + bar");
    assert_eq!(
        e.to_string(),
        "at column 5: unknown variable 'bar' (the variables are value, key and ts)"
    );
}

#[test]
fn constant_folding() {
    for (src, expected) in [
        ("1 + 2", Value::Int(3)),
        ("lower('A')", Value::str("a")),
        ("[1, 2 * 3]", j("[1, 6]")),
        ("{a: upper('x')}", j(r#"{"a":"X"}"#)),
        ("-(1 + 1)", Value::Int(-2)),
        ("len(range(4)) > 3 ? 'y' : 'n'", Value::str("y")),
        ("false && value.n > 1", Value::Bool(false)),
        ("true || value.n > 1", Value::Bool(true)),
        ("concat('a', 1, 'b', 2, 'c')", Value::str("a1b2c")),
    ] {
        match compiled(src) {
            Code::Const(Ok(v)) => assert_eq!(v, expected, "{src}"),
            _ => panic!("{src:?} was not folded"),
        }
        assert_eq!(ev(src), expected, "{src}");
    }
    // A folded error is only raised when evaluated.
    assert!(matches!(
        compiled("1 / 0"),
        Code::Const(Err(e)) if *e == EvalError::DivisionByZero
    ));
    check_err("1 / 0", EvalError::DivisionByZero);
    // Partially constant expressions fold their constant parts and still evaluate right.
    check_int("value.n + (2 * 3)", 13);
    check_int("(2 * 3) * value.n", 42);
    check("upper(lower('AB')) + value.user", r#""ABAnn""#);
    // A constant condition picks its branch at compile time, keeping the path cheap.
    assert!(matches!(compiled("true ? value.a.b : 0"), Code::Path(_)));
    assert!(matches!(compiled("if(1 > 2, 0, value.a)"), Code::Path(_)));
}

#[test]
fn hot_paths_borrow_from_the_record() {
    let r = rec();
    for src in [
        "value",
        "value.nested.x.y",
        "value.tags[-1]",
        "key",
        "value['some key']",
    ] {
        let code = compiled(src);
        assert!(matches!(code, Code::Path(_)), "{src}");
        assert!(
            matches!(
                code.eval_cow(&r, &compile::Budget::new(MAX_EVAL_BYTES)),
                Ok(Cow::Borrowed(_))
            ),
            "{src}"
        );
    }
    assert!(matches!(compiled("ts"), Code::Ts));
    // Operators over paths and constants read their operands by reference.
    assert!(matches!(compiled("value.n > 3"), Code::Dyn(_)));
    assert_eq!(ev("value.n > 3"), Value::Bool(true));
}

/// xorshift64*: a tiny deterministic generator for the no-panic tests.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn fuzz_records() -> Vec<Record> {
    vec![
        rec(),
        Record::default(),
        Record::keyed(j("[1, 2.5, \"x\"]"), -1, j("[0, -1, null, {\"x\": [1]}]")),
        Record::new(i64::MAX, Value::str("a b  c")),
        Record::new(i64::MIN, Value::Int(i64::MIN)),
    ]
}

#[test]
fn random_token_soup_never_panics() {
    #[rustfmt::skip]
    const TOKENS: &[&str] = &[
        "value", "key", "ts", "x", "n", "tags", "nested", ".", "[", "]", "(", ")", "{", "}", ",",
        ":", "?", "+", "-", "*", "/", "%", "<", "<=", ">", ">=", "==", "!=", "!", "&&", "||", "in",
        "=", "&", "|", "0", "1", "-1", "2.5", "1e3", "9223372036854775807", "9223372036854775808",
        "1e999", "'s'", "\"a b\"", "'", "\"", "'\\n'", "'\\u{41}'", "'\\q'", "true", "false",
        "null", "split", "words", "lower", "upper", "trim", "len", "contains", "starts_with",
        "ends_with", "replace", "substr", "concat", "string", "int", "float", "hash", "abs", "min",
        "max", "floor", "ceil", "round", "sqrt", "coalesce", "type_of", "keys", "get",
        "json_parse", "to_json", "if", "range", "bucket", "nope", "é", "#", " ", "\t", "'[1,{}]'",
    ];
    let seed = 0x5eed_1234_abcd_0001_u64;
    println!("token soup seed: {seed:#x}");
    let mut rng = Rng(seed);
    let records = fuzz_records();
    let (mut compiled_ok, mut evaluated_ok) = (0, 0);
    for _ in 0..4000 {
        let n = 1 + rng.below(24);
        let mut src = String::new();
        for _ in 0..n {
            src.push_str(TOKENS[rng.below(TOKENS.len())]);
            if rng.below(3) == 0 {
                src.push(' ');
            }
        }
        if let Ok(e) = Expr::compile(&src) {
            compiled_ok += 1;
            for r in &records {
                if e.eval(r).is_ok() {
                    evaluated_ok += 1;
                }
            }
        }
    }
    println!("compiled {compiled_ok}, evaluated ok {evaluated_ok}");
    assert!(compiled_ok > 0);
}

/// A random, mostly well-formed expression of at most `depth` levels.
fn random_expr(rng: &mut Rng, depth: usize) -> String {
    #[rustfmt::skip]
    const LEAVES: &[&str] = &[
        "value", "key", "ts", "value.n", "value.f", "value.user", "value.tags", "value.nested",
        "value.nul", "value.missing", "value.big", "0", "1", "-1", "7", "1000", "2.5", "-0.0",
        "9223372036854775807", "-9223372036854775808", "1e300", "'a,b'", "''", "'Hé y'", "'42'",
        "'{\"a\":1}'", "null", "true", "false", "[]", "{}", "[1, 'x', null]", "{a: 1, b: [2]}",
    ];
    #[rustfmt::skip]
    const OPS: &[&str] = &[
        "+", "-", "*", "/", "%", "<", "<=", ">", ">=", "==", "!=", "in", "&&", "||",
    ];
    #[rustfmt::skip]
    const FUNCS: &[&str] = &[
        "split", "words", "lower", "upper", "trim", "len", "contains", "starts_with", "ends_with",
        "replace", "substr", "concat", "string", "int", "float", "hash", "abs", "min", "max",
        "floor", "ceil", "round", "sqrt", "coalesce", "type_of", "keys", "get", "json_parse",
        "to_json", "if", "range", "bucket",
    ];
    if depth == 0 || rng.below(4) == 0 {
        return LEAVES[rng.below(LEAVES.len())].to_string();
    }
    let d = depth - 1;
    match rng.below(8) {
        0 => format!("{}{}", ["-", "!"][rng.below(2)], random_expr(rng, d)),
        1 | 2 => {
            let op = OPS[rng.below(OPS.len())];
            format!("({} {op} {})", random_expr(rng, d), random_expr(rng, d))
        }
        3 => format!(
            "({} ? {} : {})",
            random_expr(rng, d),
            random_expr(rng, d),
            random_expr(rng, d)
        ),
        4 => format!("{}[{}]", random_expr(rng, d), random_expr(rng, d)),
        5 => format!(
            "{}.{}",
            random_expr(rng, d),
            ["a", "n", "x", "tags"][rng.below(4)]
        ),
        6 => format!("[{}, {}]", random_expr(rng, d), random_expr(rng, d)),
        _ => {
            let f = FUNCS[rng.below(FUNCS.len())];
            let n = 1 + rng.below(3);
            let args: Vec<String> = (0..n).map(|_| random_expr(rng, d)).collect();
            format!("{f}({})", args.join(", "))
        }
    }
}

#[test]
fn random_well_formed_expressions_never_panic() {
    let seed = 0x0000_ddba_11c0_ffee_u64;
    println!("well-formed seed: {seed:#x}");
    let mut rng = Rng(seed);
    let records = fuzz_records();
    let (mut compiled_ok, mut evaluated_ok) = (0, 0);
    for _ in 0..5000 {
        let src = random_expr(&mut rng, 5);
        if let Ok(e) = Expr::compile(&src) {
            compiled_ok += 1;
            for r in &records {
                if e.eval(r).is_ok() {
                    evaluated_ok += 1;
                }
            }
        }
    }
    println!("compiled {compiled_ok}, evaluated ok {evaluated_ok}");
    assert!(compiled_ok > 2500 && evaluated_ok > 2500);
}

#[test]
fn random_bytes_never_panic() {
    let seed = 0xfeed_beef_0bad_cafe_u64;
    println!("random bytes seed: {seed:#x}");
    let mut rng = Rng(seed);
    let records = fuzz_records();
    for _ in 0..3000 {
        let n = rng.below(40);
        let bytes: Vec<u8> = (0..n)
            .map(|_| {
                // Mostly printable ASCII, sometimes anything.
                if rng.below(8) == 0 {
                    rng.next() as u8
                } else {
                    const ALPHABET: &[u8] = b" !\"#%&'()*+,-./0123456789:<=>?[\\]abceklnuvxyz{|}";
                    ALPHABET[rng.below(ALPHABET.len())]
                }
            })
            .collect();
        let src = String::from_utf8_lossy(&bytes);
        if let Ok(e) = Expr::compile(&src) {
            for r in &records {
                let _ = e.eval(r);
            }
        }
    }
}

#[test]
fn nesting_depth_is_capped() {
    let deep_inputs = |n: usize| {
        vec![
            format!("{}1{}", "(".repeat(n), ")".repeat(n)),
            format!("{}1", "-".repeat(n)),
            format!("{}true", "!".repeat(n)),
            format!("{}1{}", "[".repeat(n), "]".repeat(n)),
            format!("{}1{}", "{a: ".repeat(n), "}".repeat(n)),
            format!("{}1{}", "abs(".repeat(n), ")".repeat(n)),
            format!("1{}", " + 1".repeat(n)),
            format!("value{}", ".a".repeat(n)),
            format!("value{}", "[0]".repeat(n)),
            format!("{}0", "true ? 1 : ".repeat(n)),
            format!("{}1", "(".repeat(n)),
        ]
    };
    for src in deep_inputs(10_000) {
        let e = cerr(&src);
        assert!(
            e.message.contains("nested too deeply"),
            "{}: {e}",
            &src[..20]
        );
    }
    for src in deep_inputs(MAX_DEPTH + 1) {
        let e = cerr(&src);
        assert!(
            e.message.contains("nested too deeply"),
            "{}: {e}",
            &src[..20]
        );
    }
    // Just below the cap everything compiles and evaluates, in a thread with the default 2 MiB
    // stack of spawned threads even in debug builds (about 0.8 MiB is used at the cap in
    // debug, 0.2 MiB in release).
    let ok = |src: &str| {
        let e = compile_ok(src);
        for r in fuzz_records() {
            let _ = e.eval(&r);
        }
    };
    let near_limit = [
        format!(
            "{}1{}",
            "(".repeat(MAX_DEPTH - 1),
            ")".repeat(MAX_DEPTH - 1)
        ),
        format!("{}value.n", "-".repeat(MAX_DEPTH - 2)),
        format!("{}value.b", "!".repeat(MAX_DEPTH - 2)),
        format!(
            "{}value{}",
            "[".repeat(MAX_DEPTH - 2),
            "]".repeat(MAX_DEPTH - 2)
        ),
        format!(
            "{}value{}",
            "abs(".repeat(MAX_DEPTH - 2),
            ")".repeat(MAX_DEPTH - 2)
        ),
        format!(
            "{}value{}",
            "lower(".repeat(MAX_DEPTH - 2),
            ")".repeat(MAX_DEPTH - 2)
        ),
        format!("value{}", " + value".repeat(MAX_DEPTH - 1)),
        format!("value{}", ".a".repeat(MAX_DEPTH - 1)),
        format!("{}ts", "value.b ? 1 : ".repeat(MAX_DEPTH - 2)),
        format!(
            "{}value{}",
            "{a: ".repeat(MAX_DEPTH - 2),
            "}".repeat(MAX_DEPTH - 2)
        ),
    ];
    for src in &near_limit {
        ok(src);
    }
    let handle = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || near_limit.iter().for_each(|s| ok(s)))
        .expect("spawn");
    assert!(handle.join().is_ok());
}

/// Ensures what one evaluation builds is bounded: each string, list and JSON text an
/// expression makes is capped, and all it builds for one record together is
/// [`MAX_EVAL_BYTES`]; none of it is allocated past the limit first.
#[test]
fn what_an_evaluation_builds_is_bounded() {
    let big = "range(1000000)";
    // 24 MB each: the eleventh is over the budget, long before 24 GB.
    let many = format!("[{}]", vec![big; 1000].join(", "));
    assert_eq!(ev_err(&many), EvalError::OverBudget);
    check_int(&format!("len({big} + [1])"), 1_000_001);
    let sum = [big; 11].join(" + ");
    assert_eq!(ev_err(&format!("len({sum})")), EvalError::OverBudget);

    let r = Record::new(
        0,
        Value::map([
            ("s", Value::str(&"a".repeat(40 << 20))),
            ("text", Value::str(&format!("[{}0]", "0,".repeat(3 << 20)))),
            ("json", Value::str(&format!("[{}0]", "0,".repeat(3 << 19)))),
        ]),
    );
    let err = |src: &str| *compile_ok(src).eval(&r).unwrap_err();
    assert_eq!(err("value.s + value.s"), EvalError::TooLarge { op: "+" });
    assert_eq!(
        err("concat(value.s, '-', value.s)"),
        EvalError::TooLarge { op: "concat()" }
    );
    assert_eq!(err("split(value.s, '')"), EvalError::OverBudget);
    assert_eq!(
        err("to_json([value.s, value.s])"),
        EvalError::TooLarge { op: "to_json()" }
    );
    assert_eq!(
        err("string([value.s, value.s])"),
        EvalError::TooLarge { op: "string()" }
    );
    assert_eq!(
        err("concat(1, [value.s, value.s])"),
        EvalError::TooLarge { op: "concat()" }
    );
    assert_eq!(
        err("json_parse(value.text)"),
        EvalError::TooLarge { op: "json_parse()" }
    );
    // 3 MiB of JSON may make 36 MiB of values: the eighth parse is over the budget.
    check_len(&r, "json_parse(value.json)", (3 << 19) + 1);
    let parses = ["json_parse(value.json)"; 8].join(", ");
    assert_eq!(err(&format!("[{parses}]")), EvalError::OverBudget);
    // Lists are bounded by the budget only: two million one-char strings fit.
    check_len(&r, "split(substr(value.s, 0, 2000000), '')", 2_000_000);
    check_len(
        &r,
        "words(replace(substr(value.s, 0, 4000000), 'a', 'a '))",
        4_000_000,
    );

    // What returns its argument, or a part of one, is not charged: six 60 MiB strings
    // passed on are not 360 MiB built.
    let s = Value::str(&"a".repeat(60 << 20));
    let r = Record::new(0, Value::map([("s", s.clone())]));
    let same = "[lower(value.s), lower(value.s), trim(value.s), get(value, 's', ''), \
                min(value.s, value.s), string(value.s), replace(value.s, 'b', 'c')]";
    match compile_ok(same).eval(&r).unwrap() {
        Value::List(items) => assert!(items.iter().all(|v| v.shares_allocation(&s))),
        other => panic!("{other}"),
    }
}

#[track_caller]
fn check_len(r: &Record, src: &str, n: usize) {
    match compile_ok(src).eval(r) {
        Ok(Value::List(items)) => assert_eq!(items.len(), n, "{src}"),
        other => panic!("{src}: {other:?}"),
    }
}

/// Ensures constant folding keeps what a short expression may hold small: a constant too
/// large for the expression's folding budget is built per record instead, and still gives
/// the same result.
#[test]
fn folding_holds_constants_in_proportion_to_the_source() {
    let code = |src: &str| {
        let ast = super::parser::parse(src).unwrap();
        let fold = compile::Budget::new(FOLD_BYTES_FLOOR + FOLD_BYTES_PER_CHAR * src.len());
        compile::compile(&ast, &fold).unwrap_or_else(|e| panic!("{src}: {e}"))
    };
    assert!(code("range(100)").is_const());
    assert!(code("range(1000)").is_const());
    assert!(code("[range(100), 'x' + 'y']").is_const());
    assert!(!code("range(1000000)").is_const());
    assert!(!code("len(range(1000000))").is_const());
    check_int("len(range(1000000))", 1_000_000);
    check_int("value.n in range(1000000) ? 1 : 0", 1);
}

/// Ensures a list or map an expression builds nests at most as deep as the data plane
/// carries ([`crate::codec::MAX_VALUE_DEPTH`]): deeper, the record fails in the operator
/// that built it, naming why, instead of being refused by the next task manager (which
/// closes the connection every channel between the two shares).
#[test]
fn built_values_nest_no_deeper_than_a_record_may_carry() {
    use crate::codec::{packed, MAX_VALUE_DEPTH};
    let wrap =
        |depth: usize, inner: &str| format!("{}{inner}{}", "[".repeat(depth), "]".repeat(depth));
    let deepest = ev(&wrap(MAX_VALUE_DEPTH, "value.n"));
    assert!(!deepest.nested_deeper_than(MAX_VALUE_DEPTH));
    let rec = Record::new(0, deepest);
    let mut bytes = Vec::new();
    packed::encode_records(0, std::slice::from_ref(&rec), &mut bytes);
    assert_eq!(
        packed::decode_batch(&bytes).unwrap().records,
        vec![rec.clone()]
    );

    assert_eq!(ev_err(&wrap(MAX_VALUE_DEPTH + 1, "1")), EvalError::TooDeep);
    assert_eq!(
        ev_err(&wrap(MAX_VALUE_DEPTH + 1, "value.n")),
        EvalError::TooDeep
    );
    // A record's own value already at the limit cannot be put one level down, in a list or
    // a map.
    let err = |src: &str| *compile_ok(src).eval(&rec).unwrap_err();
    assert_eq!(err("[value]"), EvalError::TooDeep);
    assert_eq!(err("{v: value}"), EvalError::TooDeep);
    assert_eq!(
        compile_ok("value[0]")
            .eval(&rec)
            .map(|v| v.nested_deeper_than(MAX_VALUE_DEPTH - 1)),
        Ok(false)
    );
    assert!(EvalError::TooDeep
        .to_string()
        .contains("deeper than 128 levels"));
}
