// The C++ half of the nix-tier plugin: registers the builtins and the plugin's nix.conf setting,
// converts between Nix values and JSON, and turns Rust errors into positioned evaluation errors.
// All decisions are made in Rust (plugin/src); nothing here throws across the Rust boundary
// because Rust never calls back into C++.
#include "nix-compat.hh"
#include "nix-tier-plugin/src/ffi.rs.h"
#include "rust/cxx.h"

#include <sstream>

namespace nix_tier {
namespace {

struct Settings : nix::Config
{
    nix::Setting<std::string> hardwareProfile{this, "", "hardware-profile",
        "Path of a JSON hardware profile (as printed by `nix-tier profile`) that "
        "`builtins.hardwareProfile` returns instead of detecting the host. "
        "Required in pure evaluation (flakes)."};
};

Settings & settings()
{
    static Settings instance;
    return instance;
}

/// Runs a bridged Rust function; its error (cxx's rust::Error) becomes an evaluation error at `pos`.
template<typename Call>
auto callRust(nix::EvalState & state, compat::PrimOpPos pos, Call && call) -> decltype(call())
{
    try {
        return call();
    } catch (const rust::Error & e) {
        compat::throwEvalError(state, pos, e.what());
    }
}

void primHardwareProfile(nix::EvalState & state, compat::PrimOpPos pos, nix::Value **, nix::Value & v)
{
    // The setting is read here, not at load time: --option values are applied after plugins load.
    auto json = callRust(state, pos, [&] {
        return hardware_profile_json(settings().hardwareProfile.get(), compat::pureEval(state));
    });
    nix::parseJSON(state, std::string(json), v);
}

/// Strict JSON of a value, for Rust; errors (a function inside, say) are Nix's own, at `pos`.
std::string toJson(nix::EvalState & state, nix::Value & v, compat::PrimOpPos pos)
{
    std::ostringstream out;
    compat::StringContext context;
    nix::printValueAsJSON(state, true, v, pos, out, context);
    return out.str();
}

/// The Nix half of optimizeFor (plugin/nix/optimize-for.nix): `{ inspect; apply; }`, evaluated
/// once per EvalState as the hidden constant builtins.nixTierGlue, so it lives in that state's
/// garbage-collected heap and symbol table.
void primGlue(nix::EvalState & state, compat::PrimOpPos, nix::Value **, nix::Value & v)
{
    auto source = optimize_for_glue();
    state.eval(compat::parseExpression(state, std::string(source.data(), source.size())), v);
}

nix::Value & glueFunction(nix::EvalState & state, const char * name, compat::PrimOpPos pos)
{
    auto function = compat::attribute(state, state.getBuiltin("nixTierGlue"), name, pos);
    if (!function)
        compat::throwEvalError(state, pos, std::string("nix-tier plugin: internal error: the glue has no '") + name + "'");
    return *function;
}

void primOptimizeFor(nix::EvalState & state, compat::PrimOpPos pos, nix::Value ** args, nix::Value & v)
{
    auto & options = *args[0];
    auto & drv = *args[1];
    state.forceValue(options, pos);
    if (options.type() != nix::nAttrs)
        compat::throwEvalError(state, pos, "builtins.optimizeFor: the first argument must be an attribute set "
            "of options or a hardware profile, but it is " + nix::showType(options));
    state.forceValue(drv, pos);
    if (!state.isDerivation(drv))
        compat::throwEvalError(state, pos, "builtins.optimizeFor: the second argument must be a derivation "
            "(as made by stdenv.mkDerivation), but it is " + nix::showType(drv));

    nix::Value inspectOptions, facts;
    state.callFunction(glueFunction(state, "inspect", pos), options, inspectOptions, pos);
    state.callFunction(inspectOptions, drv, facts, pos);
    auto factsJson = toJson(state, facts, pos);
    auto optionsJson = toJson(state, options, pos);
    auto planned = callRust(state, pos, [&] {
        return optimize_plan(optionsJson, factsJson, compat::systemFeatures(),
            settings().hardwareProfile.get(), compat::pureEval(state));
    });
    for (auto & warning : planned.warnings)
        nix::warn("%s", std::string(warning));

    auto plan = state.allocValue();
    nix::parseJSON(state, std::string(planned.plan_json), *plan);
    nix::Value applyToPlan;
    state.callFunction(glueFunction(state, "apply", pos), *plan, applyToPlan, pos);
    state.callFunction(applyToPlan, drv, v, pos);
}

const char * const optimizeForDoc = R"(
  Returns the derivation rebuilt for a CPU: -march/-mtune in NIX_CFLAGS_COMPILE_BEFORE (-O in
  NIX_CFLAGS_COMPILE), Rust target-cpu, GOAMD64, PGO/LTO switches where the package has them and
  gccarch-* system features; the build tier stays the hook's unless asked for. Refuses targets this host cannot run unless
  forAnotherMachine = true. See docs/optimize-for.md.
)";

const char * const hardwareProfileDoc = R"(
  The host's hardware as an attribute set: CPU (vendor, model, microarchitecture, ISA level,
  gcc arch/tune, Rust target CPU, GOAMD64, features, cores, threads), memory, swap and zram,
  GPUs, and the build tiers. Detected once per evaluation, or read from the JSON profile named
  by the `hardware-profile` setting (required in pure evaluation).
)";

struct Registration
{
    Registration()
    {
        // Only loader/nix-tier-loader.cc loads this library, and only into the Nix it was built
        // against: loaded into another, it would not even resolve its symbols.
        static nix::GlobalConfig::Register config(&settings());
        compat::registerPrimOp("__hardwareProfile", {}, 0, hardwareProfileDoc, primHardwareProfile);
        compat::registerPrimOp("__optimizeFor", {"options", "drv"}, 2, optimizeForDoc, primOptimizeFor);
        compat::registerPrimOp("__nixTierGlue", {}, 0, nullptr, primGlue);
    }
} registration;

} // namespace
} // namespace nix_tier
