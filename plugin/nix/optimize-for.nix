# Glue for builtins.optimizeFor, evaluated once per evaluation by the plugin: what the plugin
# reads from a package through Nix rather than from its attributes. It decides nothing: the
# plugin reads the other facts straight from the derivation, nix-tier-model's `optimize` module
# makes the plan, and the plugin writes the `overrideAttrs` call that applies it
# (plugin/src/apply.rs).
let
  # nixpkgs' lib.functionArgs: `override` is a functor carrying the wrapped function's arguments.
  functionArgs = f:
    if f ? __functor then f.__functionArgs or (functionArgs (f.__functor f))
    else builtins.functionArgs f;
in
{
  # What `override` accepts, and which of `switches` are already on (turning one on changes
  # nothing). Read only when a plan depends on them: each switch evaluates the package twice.
  overrideFacts = switches: base:
    let args = builtins.attrNames (functionArgs base.override); in
    {
      overrideArgs = args;
      switchesOn = builtins.filter
        (s: builtins.elem s args && (base.override { ${s} = true; }).drvPath == base.drvPath)
        switches;
    };
}
