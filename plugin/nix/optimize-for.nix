# Glue for builtins.optimizeFor, evaluated once per evaluation by the plugin. It decides
# nothing: the plugin reads the facts from a derivation and nix-tier-model's `optimize` module
# makes the plan; this file applies a plan the nixpkgs way (override, then overrideAttrs).
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

  # A plan, made once and shared by every derivation that gets it, applied to `base` (the
  # derivation before any optimizeFor). `old` is read only for where the package keeps a
  # variable and its current value, which the plan appends to. What depends on the plan alone
  # is worked out here, once: an attribute named null is left out.
  apply = plan:
    let
      nixTier = builtins.fromJSON plan.info;
      features = if plan.systemFeatures == [ ] then null else "requiredSystemFeatures";
      hardening = if plan.hardeningDisable == [ ] then null else "hardeningDisable";
      change = base: old:
        let
          env = old.env or { };
          values = builtins.mapAttrs (name: extra:
            let current = toString (old.${name} or env.${name} or ""); in
            if current == "" then extra else current + " " + extra) plan.append
            // plan.set;
          # A variable stays where the package keeps it: the top level when it is there, else
          # `env` (nixpkgs forbids both, and with structured attributes only `env` is exported).
          top = builtins.intersectAttrs old values;
          inEnv = removeAttrs values (builtins.attrNames top);
        in
        plan.attributes // top // {
          passthru = (old.passthru or { }) // { nixTier = nixTier // { original = base; }; };
          ${features} = (old.requiredSystemFeatures or [ ]) ++ plan.systemFeatures;
          ${hardening} = (old.hardeningDisable or [ ]) ++ plan.hardeningDisable;
          ${if inEnv == { } then null else "env"} = env // inEnv;
        };
    in
    if plan.overrideArgs == { } && !plan.passSelf then base: base.overrideAttrs (change base)
    else base:
      let
        args = plan.overrideArgs // (if plan.passSelf then { self = result; } else { });
        result = (base.override args).overrideAttrs (change base);
      in
      result;
}
