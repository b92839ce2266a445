// The C++ half of the nix-tier plugin: registers the builtins and the plugin's nix.conf setting,
// converts between Nix values and JSON, and turns Rust errors into positioned evaluation errors.
// All decisions are made in Rust (plugin/src); nothing here throws across the Rust boundary
// because Rust never calls back into C++.
#include "nix-compat.hh"
#include "nix-tier-plugin/src/ffi.rs.h"
#include "rust/cxx.h"

#include <memory>
#include <mutex>
#include <sstream>
#include <unordered_map>

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

/// The Nix half of optimizeFor (plugin/nix/optimize-for.nix): `{ overrideFacts; apply; }`,
/// evaluated once per EvalState as the hidden constant builtins.nixTierGlue, so it lives in that
/// state's garbage-collected heap and symbol table.
void primGlue(nix::EvalState & state, compat::PrimOpPos, nix::Value **, nix::Value & v)
{
    auto source = optimize_for_glue();
    state.eval(compat::parseExpression(state, std::string(source.data(), source.size())), v);
}

nix::Value & glueFunction(nix::EvalState & state, const char * name, compat::PrimOpPos pos)
{
    auto function = compat::attribute(state, state.getBuiltin("nixTierGlue"), state.symbols.create(name), pos);
    if (!function)
        compat::throwEvalError(state, pos, std::string("nix-tier plugin: internal error: the glue has no '") + name + "'");
    return *function;
}

/// `v.name` when `v` is an attribute set that has it, else nullptr (as Nix's `or`); the
/// attribute's own value is not forced.
nix::Value * find(nix::EvalState & state, nix::Value & v, nix::Symbol name, compat::PrimOpPos pos)
{
    state.forceValue(v, pos);
    return v.type() == nix::nAttrs ? compat::attribute(state, v, name, pos) : nullptr;
}

/// A query of optimize_fact_queries(): its kind ('?', '!', '|' or 0 for a value) and path.
struct Query
{
    char kind;
    std::vector<std::string> path;
};

const std::vector<Query> & factQueries()
{
    static const auto queries = [] {
        std::vector<Query> parsed;
        std::istringstream words{std::string(optimize_fact_queries())};
        for (std::string word; words >> word;) {
            Query query{std::string("?!|").find(word[0]) != std::string::npos ? word[0] : '\0', {}};
            std::istringstream path(query.kind ? word.substr(1) : word);
            for (std::string name; std::getline(path, name, '.');)
                query.path.push_back(name);
            parsed.push_back(std::move(query));
        }
        return parsed;
    }();
    return queries;
}

/// One application of optimizeFor to its options, as the shim keeps it: Rust's handle, the
/// queries' paths as this EvalState's symbols, and `apply plan` (the glue's) for each plan made
/// so far, by number. ValueVector's memory is traced by the garbage collector.
struct Application
{
    uint64_t handle;
    nix::Symbol nixTier, original;
    std::vector<std::vector<nix::Symbol>> paths;
    nix::ValueVector appliers;
};

/// The applications by the address of their handle's Nix value, which each derivation's call
/// receives; an address reused after the garbage collector freed a handle is taken over by the
/// new application (primOptimizeFor), so an entry never outlives its EvalState's use of it.
std::mutex applicationsLock;
std::unordered_map<const nix::Value *, std::shared_ptr<Application>> applications;

std::shared_ptr<Application> application(nix::EvalState & state, const nix::Value & handle, compat::PrimOpPos pos)
{
    std::lock_guard<std::mutex> lock(applicationsLock);
    auto found = applications.find(&handle);
    if (found == applications.end())
        compat::throwEvalError(state, pos, "nix-tier plugin: internal error: unknown optimizeFor application");
    return found->second;
}

/// The facts for optimize_plan, each query read from `base`: the answers before `|` and the
/// others, each a JSON list, one after the other; and where the second begins.
std::pair<std::string, size_t> readFacts(nix::EvalState & state, const Application & app, nix::Value & base,
    compat::PrimOpPos pos)
{
    std::ostringstream out;
    // Most answers are a word: written to the buffer, past the stream's per-call checks.
    auto & words = *out.rdbuf();
    compat::StringContext context;
    std::streamsize namesEnd = 0;
    words.sputc('[');
    bool first = true;
    auto & queries = factQueries();
    for (size_t i = 0; i < queries.size(); ++i) {
        auto & query = queries[i];
        if (query.kind == '|') {
            words.sputc(']');
            namesEnd = out.tellp();
            words.sputc('[');
            first = true;
            continue;
        }
        if (!first)
            words.sputc(',');
        first = false;
        nix::Value * at = &base;
        for (auto name : app.paths[i])
            if (!(at = find(state, *at, name, pos)))
                break;
        if (!query.kind && at) {
            nix::printValueAsJSON(state, true, *at, pos, out, context);
            continue;
        }
        if (query.kind == '!' && at)
            state.forceValue(*at, pos);
        std::string_view word = !query.kind ? "null"
            : at && (query.kind == '?' || at->type() != nix::nNull) ? "true" : "false";
        words.sputn(word.data(), word.size());
    }
    words.sputc(']');
    return {out.str(), namesEnd};
}

/// `apply plan` for plan `number` of `app`, made the first time it is asked for.
nix::Value & applier(nix::EvalState & state, Application & app, uint32_t number, compat::PrimOpPos pos)
{
    if (number < app.appliers.size() && app.appliers[number])
        return *app.appliers[number];
    auto json = callRust(state, pos, [&] { return optimize_plan_json(app.handle, number); });
    // Both live on in the closure: heap values, not stack ones.
    auto plan = state.allocValue();
    nix::parseJSON(state, std::string(json), *plan);
    auto made = state.allocValue();
    state.callFunction(glueFunction(state, "apply", pos), *plan, *made, pos);
    if (app.appliers.size() <= number)
        app.appliers.resize(number + 1, nullptr);
    app.appliers[number] = made;
    return *made;
}

/// builtins.optimizeFor: resolves the options once and returns the function of derivations
/// bound to them (builtins.nixTierOptimize applied to this application's handle).
void primOptimizeFor(nix::EvalState & state, compat::PrimOpPos pos, nix::Value ** args, nix::Value & v)
{
    auto & options = *args[0];
    state.forceValue(options, pos);
    if (options.type() != nix::nAttrs)
        compat::throwEvalError(state, pos, "builtins.optimizeFor: the first argument must be an attribute set "
            "of options or a hardware profile, but it is " + nix::showType(options));
    auto optionsJson = toJson(state, options, pos);
    auto app = std::make_shared<Application>();
    app->handle = callRust(state, pos, [&] {
        return optimize_prepare(optionsJson, compat::systemFeatures(), settings().hardwareProfile.get(),
            compat::pureEval(state));
    });
    app->nixTier = state.symbols.create("nixTier");
    app->original = state.symbols.create("original");
    for (auto & query : factQueries()) {
        app->paths.emplace_back();
        for (auto & name : query.path)
            app->paths.back().push_back(state.symbols.create(name));
    }
    auto handle = state.allocValue();
    nix::parseJSON(state, std::to_string(app->handle), *handle);
    {
        std::lock_guard<std::mutex> lock(applicationsLock);
        applications[handle] = app;
    }
    state.callFunction(state.getBuiltin("nixTierOptimize"), *handle, v, pos);
}

/// builtins.nixTierOptimize handle drv: one derivation optimised under the options of `handle`.
void primOptimizeDerivation(nix::EvalState & state, compat::PrimOpPos pos, nix::Value ** args, nix::Value & v)
{
    auto & drv = *args[1];
    state.forceValue(drv, pos);
    if (!state.isDerivation(drv))
        compat::throwEvalError(state, pos, "builtins.optimizeFor: the second argument must be a derivation "
            "(as made by stdenv.mkDerivation), but it is " + nix::showType(drv));
    auto app = application(state, *args[0], pos);
    // Re-applying starts from the derivation before any optimizeFor, so the last call wins.
    nix::Value * base = &drv;
    if (auto tier = find(state, drv, app->nixTier, pos))
        if (auto original = find(state, *tier, app->original, pos))
            base = original;

    auto [facts, namesEnd] = readFacts(state, *app, *base, pos);
    auto planned = callRust(state, pos, [&] {
        return optimize_plan(app->handle, rust::Str(facts.data(), namesEnd),
            rust::Str(facts.data() + namesEnd, facts.size() - namesEnd));
    });
    if (!planned.override_switches.empty()) {
        auto switches = state.allocValue(), overrideFactsOf = state.allocValue(), overrideFacts = state.allocValue();
        nix::parseJSON(state, std::string(planned.override_switches), *switches);
        state.callFunction(glueFunction(state, "overrideFacts", pos), *switches, *overrideFactsOf, pos);
        state.callFunction(*overrideFactsOf, *base, *overrideFacts, pos);
        auto answers = facts.substr(namesEnd, facts.size() - namesEnd - 1) + "," + toJson(state, *overrideFacts, pos) + "]";
        planned = callRust(state, pos, [&] {
            return optimize_plan(app->handle, rust::Str(facts.data(), namesEnd), answers);
        });
    }
    for (auto & warning : planned.warnings)
        nix::warn("%s", std::string(warning));
    state.callFunction(applier(state, *app, planned.plan, pos), *base, v, pos);
}

const char * const optimizeForDoc = R"(
  `builtins.optimizeFor options drv` returns the derivation rebuilt for a CPU (the options are
  resolved once per `builtins.optimizeFor options`): -march/-mtune in NIX_CFLAGS_COMPILE_BEFORE (-O in
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
        compat::registerPrimOp("__optimizeFor", {"options"}, 1, optimizeForDoc, primOptimizeFor);
        compat::registerPrimOp("__nixTierOptimize", {"handle", "drv"}, 2, nullptr, primOptimizeDerivation);
        compat::registerPrimOp("__nixTierGlue", {}, 0, nullptr, primGlue);
    }
} registration;

} // namespace
} // namespace nix_tier
