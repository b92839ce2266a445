//! The Nix code that applies a plan: the `override`/`overrideAttrs` call a person would write
//! for it, with the plan's names and values written in. The shim evaluates it once per shape
//! of plan (a plan without its record, [`Plan::info`]), so applying it to a derivation costs
//! little more than the same change written by hand, where a generic function would loop over
//! the plan's variables for every derivation.

use std::collections::BTreeMap;

use nix_tier_model::optimize::Plan;

/// What a plan does to one variable.
enum Change<'a> {
    /// Appends this, space-separated, to the package's own value.
    Append(&'a str),
    /// Sets it to this.
    Set(&'a str),
}

/// Nix source of a function of the plan's record (`passthru.nixTier` without `original`, as
/// JSON text) that returns the function of derivations applying `plan`, the same for plans
/// that differ only in their record.
pub fn source(plan: &Plan) -> String {
    let mut variables: BTreeMap<&str, Change> =
        plan.append.iter().map(|(name, extra)| (name.as_str(), Change::Append(extra))).collect();
    variables.extend(plan.set.iter().map(|(name, value)| (name.as_str(), Change::Set(value))));
    // Those appended to first: they cost more to place in the set of changes.
    let mut variables: Vec<(&str, Change)> = variables.into_iter().collect();
    variables.sort_by_key(|(_, how)| matches!(how, Change::Set(_)));

    // What does not depend on where the package keeps the variables.
    let mut fixed = String::new();
    for (name, value) in &plan.attributes {
        fixed.push_str(&format!("  {} = {};\n", string(name), string(value)));
    }
    fixed.push_str("  passthru = (old.passthru or { }) // { nixTier = nixTier // { original = base; }; };\n");
    for (attribute, added) in [("requiredSystemFeatures", &plan.system_features), ("hardeningDisable", &plan.hardening_disable)] {
        if !added.is_empty() {
            let list = added.iter().map(|item| string(item)).collect::<Vec<_>>().join(" ");
            fixed.push_str(&format!("  {attribute} = (old.{attribute} or [ ]) ++ [ {list} ];\n"));
        }
    }
    let change = placements(&variables, &fixed, &mut Vec::new());

    let header = "info:\nlet nixTier = builtins.fromJSON info; in\nbase:\n";
    if plan.override_args.is_empty() && !plan.pass_self {
        format!("{header}base.overrideAttrs (old:\n{change})")
    } else {
        let mut args: Vec<String> = plan
            .override_args
            .iter()
            .filter(|(name, _)| !(plan.pass_self && *name == "self"))
            .map(|(name, on)| format!("{} = {on};", string(name)))
            .collect();
        if plan.pass_self {
            args.push("self = result;".into());
        }
        let args = args.join(" ");
        format!("{header}let result = (base.override {{ {args} }}).overrideAttrs (old:\n{change}); in\nresult")
    }
}

/// How many of a plan's variables the code decides the place of before the attribute set of
/// changes, at most: one attribute set for each of the 2^n cases is cheaper to evaluate than
/// names decided in the set, but the code grows with the cases. A plan writes one to three
/// variables, five at most.
const DECIDED: usize = 3;

/// The changes for each way the package may keep `variables`, one variable decided at a time
/// (`on_top` says for the first ones whether `old` has them at the top level): a variable goes
/// where the package keeps it, the top level when it is there, else `env` (nixpkgs forbids both;
/// with structured attributes only `env` is exported).
fn placements(variables: &[(&str, Change)], fixed: &str, on_top: &mut Vec<bool>) -> String {
    let name = match variables.get(on_top.len()) {
        Some((name, _)) if on_top.len() < DECIDED => string(name),
        _ => return changes(variables, fixed, on_top),
    };
    let mut case = |top: bool| {
        on_top.push(top);
        let change = placements(variables, fixed, on_top);
        on_top.pop();
        change
    };
    let (there, not) = (case(true), case(false));
    format!("if old ? {name} then {there}\nelse {not}")
}

/// The attribute set of changes when the package keeps the first `variables` as `on_top` says;
/// the others' places are decided in it.
fn changes(variables: &[(&str, Change)], fixed: &str, on_top: &[bool]) -> String {
    let mut change = format!("{{\n{fixed}");
    let mut env = String::new();
    let mut undecided = Vec::new();
    for (i, (name, how)) in variables.iter().enumerate() {
        let name = string(name);
        let (top_value, env_value) =
            (new_value(how, &format!("old.{name}")), new_value(how, &format!("(old.env.{name} or \"\")")));
        match on_top.get(i) {
            Some(true) => change.push_str(&format!("  {name} = {top_value};\n")),
            Some(false) => env.push_str(&format!("    {name} = {env_value};\n")),
            None => {
                change.push_str(&format!("  ${{if old ? {name} then {name} else null}} = {top_value};\n"));
                env.push_str(&format!("    ${{if old ? {name} then null else {name}}} = {env_value};\n"));
                undecided.push(format!("old ? {name}"));
            }
        }
    }
    if !env.is_empty() {
        let attribute = if on_top.iter().all(|&top| top) {
            format!("${{if {} then null else \"env\"}}", undecided.join(" && "))
        } else {
            "env".to_string()
        };
        change.push_str(&format!("  {attribute} = (old.env or {{ }}) // {{\n{env}  }};\n"));
    }
    change.push('}');
    change
}

/// The new value of a variable whose current value, if any, is `current` (a Nix expression).
fn new_value(how: &Change, current: &str) -> String {
    match how {
        Change::Set(value) => string(value),
        Change::Append(extra) => format!(
            "let current = toString {current}; in if current == \"\" then {} else current + {}",
            string(extra),
            string(&format!(" {extra}"))
        ),
    }
}

/// `text` as a Nix string literal, nothing in it interpolated.
fn string(text: &str) -> String {
    let mut literal = String::with_capacity(text.len() + 2);
    literal.push('"');
    for c in text.chars() {
        match c {
            '"' | '\\' | '$' => {
                literal.push('\\');
                literal.push(c);
            }
            '\n' => literal.push_str("\\n"),
            '\r' => literal.push_str("\\r"),
            '\t' => literal.push_str("\\t"),
            c => literal.push(c),
        }
    }
    literal.push('"');
    literal
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix_tier_model::optimize::{self, Facts};

    #[test]
    fn the_first_three_variables_are_placed_before_the_changes_the_others_in_them() {
        let facts = Facts { has_override_attrs: true, ..Default::default() };
        let options = r#"{ "target": "x86_64", "forAnotherMachine": true }"#;
        let mut plan = optimize::plan(options, &facts, None, || crate::hardware_profile::load("", false)).unwrap();
        let pairs = |pairs: &[(&str, &str)]| pairs.iter().map(|&(k, v)| (k.to_string(), v.to_string())).collect();
        plan.append = pairs(&[("A", "-a"), ("C", "-c"), ("D", "-d")]);
        plan.set = pairs(&[("B", "b")]);
        let code = source(&plan);
        // Appended variables first: A, C, D decided in 1 + 2 + 4 places, then B in each of the
        // eight sets of changes, at the top level or in `env`.
        for (decided, count) in [("A", 1), ("C", 2), ("D", 4)] {
            assert_eq!(code.matches(&format!("if old ? \"{decided}\" then")).count(), count, "{code}");
        }
        assert_eq!(code.matches(r#"${if old ? "B" then "B" else null} = "b";"#).count(), 8, "{code}");
        assert_eq!(code.matches(r#"${if old ? "B" then null else "B"} = "b";"#).count(), 8, "{code}");
        // `env` is there for sure in the seven sets where A, C or D goes in it.
        assert_eq!(code.matches("  env = (old.env or { })").count(), 7, "{code}");
        assert_eq!(code.matches(r#"${if old ? "B" then null else "env"} = (old.env or { })"#).count(), 1, "{code}");
    }

    #[test]
    fn strings_are_quoted_with_nothing_interpolated() {
        assert_eq!(string("-O3"), r#""-O3""#);
        assert_eq!(string("a\"b\\c${d}$e\n"), r#""a\"b\\c\${d}\$e\n""#);
    }
}
