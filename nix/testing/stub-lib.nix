# A minimal stand-in for the parts of nixpkgs' `lib` that nix-tier's modules use, so that the
# modules can be evaluated (tests/tests/nix_files.rs) and documented (scripts/gen-reference)
# where nixpkgs is not available. It is NOT nixpkgs' module system: options are plain records,
# `mkIf`/`mkMerge`/`mkDefault` are tagged values that ./eval-module.nix resolves, and types
# only check values and describe themselves. The modules must stay within what is here.
let
  inherit (builtins) all attrValues concatStringsSep elem isAttrs isBool isInt isList isPath isString match toString;

  mkType = name: description: check: { _type = "option-type"; inherit name description check; };
  isDerivation = v: isAttrs v && (v.type or null) == "derivation";

  types = rec {
    bool = mkType "bool" "boolean" isBool;
    int = mkType "int" "signed integer" isInt;
    str = mkType "str" "string" isString;
    lines = mkType "lines" "strings concatenated with \"\\n\"" isString;
    path = mkType "path" "path" (v: isPath v || (isString v && match "/.*" v != null) || isDerivation v);
    package = mkType "package" "package" (v: isDerivation v || isPath v || isString v);
    anything = mkType "anything" "anything" (_: true);
    attrs = mkType "attrs" "attribute set" isAttrs;
    ints = {
      positive = mkType "positiveInt" "positive integer, meaning >0" (v: isInt v && v > 0);
      unsigned = mkType "unsignedInt" "unsigned integer, meaning >=0" (v: isInt v && v >= 0);
    };
    nullOr = t: mkType "nullOr" "null or ${t.description}" (v: v == null || t.check v);
    listOf = t: mkType "listOf" "list of ${t.description}" (v: isList v && all t.check v);
    attrsOf = t: mkType "attrsOf" "attribute set of ${t.description}" (v: isAttrs v && all t.check (attrValues v));
    enum = values: mkType "enum" "one of ${concatStringsSep ", " (map (v: "\"${toString v}\"") values)}" (v: elem v values);
    either = a: b: mkType "either" "${a.description} or ${b.description}" (v: a.check v || b.check v);
  };
in
{
  inherit types isDerivation;

  mkOption = attrs: attrs // { _type = "option"; };
  mkEnableOption = name: {
    _type = "option";
    type = types.bool;
    default = false;
    example = true;
    description = "Whether to enable ${name}.";
  };
  literalExpression = text: { _type = "literalExpression"; inherit text; };
  literalMD = text: { _type = "literalMD"; inherit text; };

  mkIf = condition: content: { _type = "if"; inherit condition content; };
  mkMerge = contents: { _type = "merge"; inherit contents; };
  mkOverride = priority: content: { _type = "override"; inherit priority content; };
  mkDefault = content: { _type = "override"; priority = 1000; inherit content; };
  mkForce = content: { _type = "override"; priority = 50; inherit content; };

  optional = cond: x: if cond then [ x ] else [ ];
  optionals = cond: xs: if cond then xs else [ ];
  optionalAttrs = cond: attrs: if cond then attrs else { };
  optionalString = cond: s: if cond then s else "";
  getVersion = x: if isString x then x else x.version or (builtins.parseDrvName x.name).version;
  versionAtLeast = v: wanted: builtins.compareVersions v wanted >= 0;
  concatStringsSep = builtins.concatStringsSep;
}
