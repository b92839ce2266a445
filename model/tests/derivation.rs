//! Reading and writing `.drv` files: real ones written by Nix 2.8 (`fixtures/drv/`, made
//! by `fixtures/drv/generate.sh`), generated ones, and malformed ones.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use nix_tier_model::{Derivation, DerivationError, DerivationOutput, OutputKind};
use proptest::prelude::*;

const STORE: &str = "/tmp/nix-tier-drv-fixtures/store";

fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/drv")
        .join(name)
}

fn fixture_text(name: &str) -> String {
    std::fs::read_to_string(fixture_path(name)).unwrap()
}

fn fixture(name: &str) -> Derivation {
    Derivation::read(&fixture_path(name)).unwrap()
}

const FIXTURES: &[&str] = &[
    "builtin-fetchurl.drv",
    "ca-floating.drv",
    "deferred.drv",
    "dependent.drv",
    "fixed-flat.drv",
    "fixed-recursive.drv",
    "impure.drv",
    "multi-output.drv",
    "structured-attrs.drv",
];

#[test]
fn every_fixture_round_trips_byte_for_byte() {
    let mut found: Vec<_> = std::fs::read_dir(fixture_path(""))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".drv"))
        .collect();
    found.sort();
    assert_eq!(found, FIXTURES);
    for name in FIXTURES {
        let text = fixture_text(name);
        let drv = Derivation::parse(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(drv.to_aterm(), text, "{name}");
        assert_eq!(fixture(name), drv, "{name}");
    }
}

#[test]
fn multiple_outputs_and_escapes() {
    let drv = fixture("multi-output.drv");
    assert_eq!(
        drv.outputs.keys().collect::<Vec<_>>(),
        ["dev", "doc", "out"]
    );
    let out = &drv.outputs["out"];
    assert_eq!(
        out.path,
        format!("{STORE}/bmalwi25yv4zigg4y7hyk5cvx8z4804m-lib")
    );
    assert_eq!((out.hash_algo.as_str(), out.hash.as_str()), ("", ""));
    assert_eq!(out.kind(), OutputKind::InputAddressed);
    assert_eq!(
        drv.output_paths().collect::<Vec<_>>(),
        [
            format!("{STORE}/w10288zd96bkzijh4x6i5dyz7qrvf7hb-lib-dev"),
            format!("{STORE}/cj2hsh4fnvpz56y0k5qdjk9278aqinxy-lib-doc"),
            format!("{STORE}/bmalwi25yv4zigg4y7hyk5cvx8z4804m-lib"),
        ]
    );
    assert!(drv.input_derivations.is_empty() && drv.input_sources.is_empty());
    assert_eq!(drv.platform, "x86_64-linux");
    assert_eq!(drv.builder, "/bin/sh");
    assert_eq!(drv.args, ["-c", "echo \"q\" > $out; mkdir $dev"]);
    assert_eq!(drv.env["FOO"], "a\nb\t\\\"c");
    assert_eq!(drv.env["outputs"], "out dev doc");
    assert_eq!(drv.name().as_deref(), Some("lib"));
    assert_eq!(drv.required_system_features(), ["big-parallel"]);
    assert!(!drv.is_fixed_output());
}

#[test]
fn dependencies_sources_and_unicode() {
    let drv = fixture("dependent.drv");
    let mut inputs = BTreeMap::new();
    inputs.insert(
        format!("{STORE}/ll33fww4xqmg6k8d2n4zng0kyra1j9qr-lib.drv"),
        BTreeSet::from(["dev".to_string(), "out".to_string()]),
    );
    assert_eq!(drv.input_derivations, inputs);
    assert_eq!(
        drv.input_sources,
        BTreeSet::from([format!("{STORE}/d84ygh72yiz4li4c4c8iq67nz7rjkdh6-src.txt")])
    );
    assert_eq!(drv.env["UNICODE"], "héllo ✓ 𝄞 — \r\n end");
    assert_eq!(drv.env["EMPTY"], "");
    assert_eq!(drv.env["weird key"], "v");
    assert_eq!(drv.name().as_deref(), Some("app"));
    // "kvm  nixos-test\tbig-parallel\n": split at any whitespace Nix splits at, sorted.
    assert_eq!(
        drv.required_system_features(),
        ["big-parallel", "kvm", "nixos-test"]
    );
    // The input derivation of `dependent` is `multi-output`.
    let lib_outputs: BTreeSet<_> = fixture("multi-output.drv")
        .output_paths()
        .map(str::to_owned)
        .collect();
    assert!(drv.args[1].contains(
        lib_outputs
            .iter()
            .find(|p| p.ends_with("-lib-dev"))
            .unwrap()
    ));
}

#[test]
fn structured_attrs() {
    let drv = fixture("structured-attrs.drv");
    assert_eq!(drv.env.keys().collect::<Vec<_>>(), ["__json", "bin", "out"]);
    assert_eq!(drv.name().as_deref(), Some("structured"));
    assert_eq!(drv.required_system_features(), ["big-parallel", "kvm"]);
    assert_eq!(
        drv.input_derivations[&format!("{STORE}/ll33fww4xqmg6k8d2n4zng0kyra1j9qr-lib.drv")],
        BTreeSet::from(["dev".to_string()])
    );
    let json: serde_json::Value = serde_json::from_str(&drv.env["__json"]).unwrap();
    assert_eq!(json["nested"]["quote"], "a\"b\\c\nd");
}

#[test]
fn content_addressed_outputs() {
    let fixed = fixture("fixed-recursive.drv");
    let out = &fixed.outputs["out"];
    assert_eq!(out.kind(), OutputKind::Fixed);
    assert_eq!(out.hash_algo, "r:sha256");
    assert_eq!(
        out.hash,
        "0a430879c266f8b57f4092a0f935cf3facd48bbccde5760d4748ca405171e969"
    );
    assert!(fixed.is_fixed_output());
    assert!(fixed.required_system_features().is_empty());

    let flat = fixture("fixed-flat.drv");
    assert_eq!(flat.outputs["out"].hash_algo, "sha1");
    assert!(flat.is_fixed_output());

    let fetch = fixture("builtin-fetchurl.drv");
    assert_eq!(
        (fetch.platform.as_str(), fetch.builder.as_str()),
        ("builtin", "builtin:fetchurl")
    );
    assert!(fetch.is_fixed_output());

    let floating = fixture("ca-floating.drv");
    for output in floating.outputs.values() {
        assert_eq!(output.kind(), OutputKind::Floating);
        assert_eq!(
            (output.path.as_str(), output.hash_algo.as_str()),
            ("", "r:sha256")
        );
    }
    assert_eq!(floating.output_paths().count(), 0);
    assert_eq!(floating.required_system_features(), ["ca-derivations"]);
    assert!(!floating.is_fixed_output());

    let deferred = fixture("deferred.drv");
    assert_eq!(deferred.outputs["out"].kind(), OutputKind::Deferred);
    assert_eq!(deferred.required_system_features(), ["ca-derivations"]);

    let impure = fixture("impure.drv");
    assert_eq!(impure.outputs["out"].kind(), OutputKind::Impure);
    assert_eq!(impure.required_system_features(), ["ca-derivations"]);
}

#[test]
fn required_system_features_edge_cases() {
    let mut drv = Derivation::default();
    assert!(drv.required_system_features().is_empty());
    drv.env
        .insert("requiredSystemFeatures".into(), " \r\n\t ".into());
    assert!(drv.required_system_features().is_empty());
    drv.env
        .insert("requiredSystemFeatures".into(), "b a b\u{a0}c".into());
    // Only space, tab, newline and CR separate (not U+00A0), as in Nix.
    assert_eq!(drv.required_system_features(), ["a", "b", "b\u{a0}c"]);

    // With structured attributes the environment variable is ignored.
    drv.env.insert(
        "__json".into(),
        r#"{"requiredSystemFeatures":["x y","x y"]}"#.into(),
    );
    assert_eq!(drv.required_system_features(), ["x y"]);
    drv.env.insert("__json".into(), r#"{"name":"n"}"#.into());
    assert!(drv.required_system_features().is_empty());
    assert_eq!(drv.name().as_deref(), Some("n"));
    drv.env.insert("name".into(), "from-env".into());
    assert_eq!(drv.name().as_deref(), Some("from-env"));
    for bad in [
        r#"{"requiredSystemFeatures":"kvm"}"#,
        r#"{"requiredSystemFeatures":[1]}"#,
        "{",
    ] {
        drv.env.insert("__json".into(), bad.into());
        let error = drv.try_required_system_features().unwrap_err();
        assert!(
            matches!(error, DerivationError::StructuredAttrs { .. }),
            "{bad}: {error}"
        );
        assert!(drv.required_system_features().is_empty());
    }
}

#[test]
fn structured_attributes_are_read_from_json() {
    let mut drv = Derivation::default();
    drv.env.insert(
        "__json".into(),
        r#"{"a":[1,{"name":"inner"}],"name":"n\"q","NIX_TIER":"heavy","cores":4}"#.into(),
    );
    assert_eq!(drv.name().as_deref(), Some("n\"q"));
    assert_eq!(drv.string_attribute("NIX_TIER").as_deref(), Some("heavy"));
    assert_eq!(drv.string_attribute("cores"), None, "not a string");
    assert_eq!(drv.string_attribute("missing"), None);
    drv.env.insert(
        "__json".into(),
        r#"{"a":[1,{"name":"inner"}],"name":"plain-1.0"}"#.into(),
    );
    assert_eq!(drv.name().as_deref(), Some("plain-1.0"));
}

// ---------------------------------------------------------------------------------------
// Malformed input

fn syntax_error(text: &str) -> (usize, String, String) {
    match Derivation::parse(text) {
        Err(DerivationError::Syntax {
            file: None,
            offset,
            expected,
            found,
        }) => (offset, expected, found),
        other => panic!("{text:?}: expected a syntax error, got {other:?}"),
    }
}

const MINIMAL: &str = r#"Derive([("out","/s/x","","")],[("/s/d.drv",["out"])],["/s/src"],"sys","/bin/sh",["-c"],[("A","b")])"#;

#[test]
fn minimal_reads() {
    let drv = Derivation::parse(MINIMAL).unwrap();
    assert_eq!(drv.to_aterm(), MINIMAL);
    let empty = r#"Derive([],[],[],"","",[],[])"#;
    assert_eq!(Derivation::parse(empty).unwrap(), Derivation::default());
    assert_eq!(Derivation::default().to_aterm(), empty);
}

#[test]
fn every_truncation_is_an_error_with_offset() {
    for name in FIXTURES {
        let text = fixture_text(name);
        for (end, _) in text.char_indices() {
            let (offset, expected, found) = syntax_error(&text[..end]);
            assert!(offset <= end, "{name} cut at {end}: offset {offset}");
            assert!(!expected.is_empty());
            assert!(!found.is_empty());
        }
    }
}

#[test]
fn truncated_string() {
    let (offset, expected, found) = syntax_error(r#"Derive([("out","/s/x"#);
    assert_eq!(offset, 20);
    assert_eq!(expected, "`\"` ending the string that starts at byte 15");
    assert_eq!(found, "end of input");
}

#[test]
fn bad_escape_at_end() {
    let text = r#"Derive([("out\"#;
    let (offset, expected, found) = syntax_error(text);
    assert_eq!(offset, text.len() - 1);
    assert_eq!(expected, "a character after the escaping `\\`");
    assert_eq!(found, "`\\\\`");
}

#[test]
fn escapes_of_other_characters_read_as_the_character() {
    // Nix never writes these, but reads `\x` as `x` for any other x; so does this reader.
    let text = MINIMAL.replace(r#""b""#, r#""\a\✓\\\"\n""#);
    assert_eq!(Derivation::parse(&text).unwrap().env["A"], "a✓\\\"\n");
}

#[test]
fn wrong_keyword() {
    for (text, expected) in [
        ("Derivation([", "`Derive(`"),
        ("derive([],[],[],\"\",\"\",[],[])", "`Derive(`"),
        (" Derive([],[],[],\"\",\"\",[],[])", "`Derive(`"),
        ("", "`Derive(`"),
    ] {
        let (offset, exp, _) = syntax_error(text);
        assert_eq!((offset, exp.as_str()), (0, expected), "{text:?}");
    }
    let (offset, expected, found) =
        syntax_error(r#"DrvWithVersion("xp-dyn-drv",[],[],[],"","",[],[])"#);
    assert_eq!(offset, 0);
    assert!(expected.contains("later derivation format"), "{expected}");
    assert_eq!(found, "`DrvWithVersion(\\\"xp-dyn-d`…");
}

#[test]
fn missing_commas() {
    // Between the top-level fields.
    let text = MINIMAL.replacen("],[(\"/s/d", "][(\"/s/d", 1);
    let (offset, expected, found) = syntax_error(&text);
    assert_eq!(
        (offset, expected.as_str()),
        (text.find("][").unwrap() + 1, "`,`")
    );
    assert!(found.starts_with("`[(\\\""), "{found}");
    // Inside a tuple.
    let text = MINIMAL.replace(r#"("out","/s/x""#, r#"("out""/s/x""#);
    assert_eq!(syntax_error(&text).1, "`,`");
    // Between list items (Nix's own reader lets this one pass).
    let text = MINIMAL.replace(r#"["-c"]"#, r#"["-c""-d"]"#);
    let (offset, expected, _) = syntax_error(&text);
    assert_eq!(
        (offset, expected.as_str()),
        (text.find(r#""-d""#).unwrap(), "`,` or `]`")
    );
    // Leading and trailing commas.
    for list in [r#"[,"-c"]"#, r#"["-c",]"#] {
        let text = MINIMAL.replace(r#"["-c"]"#, list);
        assert!(Derivation::parse(&text).is_err(), "{text}");
    }
}

#[test]
fn text_after_the_end() {
    for tail in ["\n", " ", ")", "Derive("] {
        let text = format!("{MINIMAL}{tail}");
        let (offset, expected, _) = syntax_error(&text);
        assert_eq!(offset, MINIMAL.len());
        assert_eq!(expected, "end of input after the closing `)`");
    }
}

#[test]
fn relative_paths() {
    // (replace, with, where in `with` the bad path starts)
    for (from, to, at) in [
        (r#"[("/s/d.drv""#, r#"[("s/d.drv""#, 2),
        (r#"["/s/src"]"#, r#"["s/src"]"#, 1),
        (r#"["/s/src"]"#, r#"[""]"#, 1),
        (r#""/s/x","","")"#, r#""s/x","","")"#, 0),
    ] {
        let text = MINIMAL.replace(from, to);
        let (offset, expected, _) = syntax_error(&text);
        assert_eq!(offset, text.find(to).unwrap() + at, "{text}");
        assert!(expected.contains("absolute"), "{expected}");
    }
}

#[test]
fn duplicates() {
    for (from, to) in [
        (
            r#"[("out","/s/x","","")]"#,
            r#"[("out","/s/x","",""),("out","/s/y","","")]"#,
        ),
        (
            r#"[("/s/d.drv",["out"])]"#,
            r#"[("/s/d.drv",["out"]),("/s/d.drv",["dev"])]"#,
        ),
        (r#"["out"]"#, r#"["out","out"]"#),
        (r#"["/s/src"]"#, r#"["/s/src","/s/src"]"#),
        (r#"[("A","b")]"#, r#"[("A","b"),("A","c")]"#),
    ] {
        let text = MINIMAL.replace(from, to);
        let (offset, expected, _) = syntax_error(&text);
        assert!(expected.contains("not listed before"), "{text}: {expected}");
        assert!(offset > text.find(to).unwrap(), "{text}: {offset}");
    }
}

#[test]
fn read_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.drv");
    std::fs::write(&path, "Derive([").unwrap();
    let error = Derivation::read(&path).unwrap_err();
    assert_eq!(error.offset(), Some(8));
    let message = error.to_string();
    assert!(message.starts_with(&format!(
        "derivation {}: malformed at byte 8",
        path.display()
    )));
    assert!(message.ends_with("expected `(`, found end of input") || message.contains("expected"));

    std::fs::write(&path, b"Derive([(\"\xff").unwrap();
    let error = Derivation::read(&path).unwrap_err();
    assert!(
        matches!(error, DerivationError::NotUtf8 { offset: 10, .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("bad.drv"));

    let missing = dir.path().join("missing.drv");
    let error = Derivation::read(&missing).unwrap_err();
    assert!(matches!(error, DerivationError::Read { .. }));
    assert!(error.to_string().contains("missing.drv"), "{error}");
}

#[test]
fn error_messages() {
    let error = Derivation::parse(r#"Derive([("out","/s/x","","")],[)"#).unwrap_err();
    assert_eq!(
        error.to_string(),
        "malformed derivation at byte 31: expected `(`, found `)`"
    );
    let error = Derivation::parse(r#"Derive([("out","/s/x","","")],[],["#).unwrap_err();
    assert_eq!(
        error.to_string(),
        "malformed derivation at byte 34: expected `\"` starting a string, found end of input"
    );
}

// ---------------------------------------------------------------------------------------
// Generated derivations

/// Any string: arbitrary Unicode, or short strings rich in the characters Nix escapes.
fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![any::<String>(), "[\"\\\\\n\r\t ()\\[\\],a-zé✓𝄞]{0,12}"]
}

/// A string Nix writes verbatim and still reads back: anything but `"` and `\`.
fn verbatim_text() -> impl Strategy<Value = String> {
    prop_oneof!["[^\"\\\\]{0,16}", "[\n\r\t ()\\[\\],a-zé✓]{0,12}"]
}

fn any_path() -> impl Strategy<Value = String> {
    verbatim_text().prop_map(|s| format!("/{s}"))
}

fn any_output() -> impl Strategy<Value = DerivationOutput> {
    (
        prop_oneof![Just(String::new()), any_path()],
        verbatim_text(),
        verbatim_text(),
    )
        .prop_map(|(path, hash_algo, hash)| DerivationOutput {
            path,
            hash_algo,
            hash,
        })
}

fn any_derivation() -> impl Strategy<Value = Derivation> {
    (
        prop::collection::btree_map(verbatim_text(), any_output(), 0..4),
        prop::collection::btree_map(
            any_path(),
            prop::collection::btree_set(verbatim_text(), 0..3),
            0..3,
        ),
        prop::collection::btree_set(any_path(), 0..3),
        verbatim_text(),
        any_text(),
        prop::collection::vec(any_text(), 0..4),
        prop::collection::btree_map(any_text(), any_text(), 0..6),
    )
        .prop_map(
            |(outputs, input_derivations, input_sources, platform, builder, args, env)| {
                Derivation {
                    outputs,
                    input_derivations,
                    input_sources,
                    platform,
                    builder,
                    args,
                    env,
                }
            },
        )
}

#[derive(Debug, Clone)]
enum Mutation {
    Set(usize, u8),
    Delete(usize),
    Insert(usize, u8),
    Truncate(usize),
}

fn any_mutation() -> impl Strategy<Value = Mutation> {
    // Structural bytes most of the time, any byte otherwise.
    let byte = prop_oneof![prop::sample::select(b"\"\\,()[]Dn".to_vec()), any::<u8>(),];
    prop_oneof![
        (any::<usize>(), byte.clone()).prop_map(|(at, b)| Mutation::Set(at, b)),
        any::<usize>().prop_map(Mutation::Delete),
        (any::<usize>(), byte).prop_map(|(at, b)| Mutation::Insert(at, b)),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn mutate(text: &str, mutations: &[Mutation]) -> String {
    let mut bytes = text.as_bytes().to_vec();
    for mutation in mutations {
        let len = bytes.len();
        match *mutation {
            Mutation::Set(at, b) if len > 0 => bytes[at % len] = b,
            Mutation::Delete(at) if len > 0 => {
                bytes.remove(at % len);
            }
            Mutation::Insert(at, b) => bytes.insert(at % (len + 1), b),
            Mutation::Truncate(at) => bytes.truncate(at % (len + 1)),
            _ => {}
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn generated_derivations_round_trip(drv in any_derivation()) {
        let text = drv.to_aterm();
        let parsed = Derivation::parse(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&parsed, &drv);
        prop_assert_eq!(parsed.to_aterm(), text);
    }

    #[test]
    fn mutated_derivations_never_panic(
        drv in any_derivation(),
        mutations in prop::collection::vec(any_mutation(), 1..4),
    ) {
        let text = mutate(&drv.to_aterm(), &mutations);
        if let Err(error) = Derivation::parse(&text) {
            let offset = error.offset().unwrap();
            prop_assert!(offset <= text.len());
            prop_assert!(text.is_char_boundary(offset));
        }
    }

    #[test]
    fn mutated_fixtures_never_panic(
        index in 0..FIXTURES.len(),
        mutations in prop::collection::vec(any_mutation(), 1..4),
    ) {
        let text = mutate(&fixture_text(FIXTURES[index]), &mutations);
        if let Err(error) = Derivation::parse(&text) {
            prop_assert!(error.offset().unwrap() <= text.len());
        }
    }

    #[test]
    fn arbitrary_text_never_panics(text in any::<String>()) {
        let _ = Derivation::parse(&text);
        let _ = Derivation::parse(&format!("Derive([{text}"));
    }
}
