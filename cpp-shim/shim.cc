// The C++ half of the nix-tier plugin: registers the builtins and the plugin's nix.conf setting,
// reads what Rust asks for from Nix values, evaluates the Nix code Rust writes, and turns Rust
// errors into positioned evaluation errors.
// All decisions are made in Rust (plugin/src); nothing here throws across the Rust boundary
// because Rust never calls back into C++.
#include "nix-compat.hh"
#include "nix-tier-plugin/src/ffi.rs.h"
#include "rust/cxx.h"

#include <array>
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

/// The Nix half of optimizeFor (plugin/nix/optimize-for.nix): `{ overrideFacts; }`, evaluated
/// once per EvalState as the hidden constant builtins.nixTierGlue, so it lives in that state's
/// garbage-collected heap and symbol table.
void primGlue(nix::EvalState & state, compat::PrimOpPos, nix::Value **, nix::Value & v)
{
    auto source = optimize_for_glue();
    state.eval(compat::parseExpression(state, std::string(source.data(), source.size())), v);
}

/// `v.name` when `v` is an attribute set that has it, else nullptr (as Nix's `or`); the
/// attribute's own value is not forced.
nix::Value * find(nix::EvalState & state, nix::Value & v, nix::Symbol name, compat::PrimOpPos pos)
{
    state.forceValue(v, pos);
    return v.type() == nix::nAttrs ? compat::attribute(v, name) : nullptr;
}

nix::Value & glueFunction(nix::EvalState & state, const char * name, compat::PrimOpPos pos)
{
    auto function = find(state, state.getBuiltin("nixTierGlue"), state.symbols.create(name), pos);
    if (!function)
        compat::throwEvalError(state, pos, std::string("nix-tier plugin: internal error: the glue has no '") + name + "'");
    return *function;
}

/// The longest attribute path a query may have.
constexpr size_t maxPath = 4;

/// A query of optimize_fact_queries(): its kind ('?', '!', '=', '|' or 0 for a value), its
/// path and length, and how many of the path's first names it shares with the previous query's.
/// Two or more queries in a row under one attribute (`stdenv.cc.isGNU`, `stdenv.cc.version`) are
/// a group, whose first query has where the group ends and its answers when that attribute is
/// absent: its answers are the same while the attribute is the same value.
struct Query
{
    char kind;
    std::vector<std::string> path;
    size_t length = 0, shared = 0, groupEnd = 0;
    bool endsGroup = false;
    std::string absent{};
};

const std::vector<Query> & factQueries()
{
    static const auto queries = [] {
        std::vector<Query> parsed;
        std::istringstream words{std::string(optimize_fact_queries())};
        for (std::string word; words >> word;) {
            Query query{std::string("?!=|").find(word[0]) != std::string::npos ? word[0] : '\0', {}};
            std::istringstream path(query.kind ? word.substr(1) : word);
            for (std::string name; std::getline(path, name, '.');)
                query.path.push_back(name);
            query.length = query.path.size();
            if (query.length > maxPath)
                throw std::logic_error("nix-tier plugin: a fact query's path is longer than " + std::to_string(maxPath));
            parsed.push_back(std::move(query));
        }
        const std::vector<std::string> * previous = nullptr;
        for (size_t i = 0; i < parsed.size(); ++i) {
            auto & query = parsed[i];
            if (query.kind == '|')
                continue;
            while (previous && query.shared < std::min(previous->size(), query.length)
                && (*previous)[query.shared] == query.path[query.shared])
                ++query.shared;
            previous = &query.path;
            auto inGroup = [&](const Query & other) {
                return other.kind != '|' && other.length > 1 && other.path[0] == query.path[0];
            };
            if (inGroup(query) && (i == 0 || !inGroup(parsed[i - 1]))) {
                size_t end = i + 1;
                while (end < parsed.size() && inGroup(parsed[end]))
                    ++end;
                if (end > i + 1) {
                    query.groupEnd = end;
                    parsed[end - 1].endsGroup = true;
                    for (size_t j = i; j < end; ++j)
                        query.absent += parsed[j].kind ? '0' : 'n';
                }
            }
        }
        return parsed;
    }();
    return queries;
}

/// One application of optimizeFor to its options, as the shim keeps it: Rust's handle, the
/// queries' paths as this EvalState's symbols, the answers to each group of queries (by its
/// first) for the value it was last read from, the code of each shape of plan evaluated so far
/// and the function applying each plan made so far, by number. ValueVector's memory is traced by
/// the garbage collector, so a value read from stays alive and its address names it.
struct Application
{
    uint64_t handle;
    nix::Symbol nixTier, original;
    std::vector<std::vector<nix::Symbol>> paths;
    std::vector<std::string> groupAnswers;
    nix::ValueVector groupValues, shapes, appliers;
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

/// Appends the answer to a query of a value: `n` when absent, else `s` and a string's text or
/// `j` and another value's JSON, ended by a NUL byte.
void writeValue(nix::EvalState & state, nix::Value * v, std::string & answers, compat::PrimOpPos pos)
{
    if (!v) {
        answers += 'n';
        return;
    }
    state.forceValue(*v, pos);
    if (v->type() == nix::nString) {
        answers += 's';
        answers += compat::text(*v);
    } else {
        answers += 'j';
        answers += toJson(state, *v, pos);
    }
    answers += '\0';
}

/// The answers to factQueries() read from `base`, written as plugin/src/optimize_for.rs's
/// FACT_QUERIES says: the names' and then the others'; and where the others begin.
std::pair<std::string, size_t> readFacts(nix::EvalState & state, Application & app, nix::Value & base,
    compat::PrimOpPos pos)
{
    std::string answers;
    answers.reserve(128);
    size_t namesEnd = 0;
    // The values along the previous query's path (nullptr past an absent attribute), which the
    // next query starts from where the paths agree.
    std::array<nix::Value *, maxPath + 1> along{&base};
    // The group of queries being answered: its first query and where its answers begin.
    size_t group = 0, groupStart = 0;
    auto & queries = factQueries();
    for (size_t i = 0, count = queries.size(); i < count; ++i) {
        auto & query = queries[i];
        if (query.kind == '|') {
            namesEnd = answers.size();
            continue;
        }
        auto path = app.paths[i].data();
        size_t k = query.shared;
        if (query.groupEnd) {
            if (k == 0)
                along[++k] = find(state, base, path[0], pos);
            if (!along[1] || along[1] == app.groupValues[i]) {
                answers += along[1] ? app.groupAnswers[i] : query.absent;
                i = query.groupEnd - 1;
                continue;
            }
            group = i;
            groupStart = answers.size();
        }
        for (; k < query.length; ++k)
            along[k + 1] = along[k] ? find(state, *along[k], path[k], pos) : nullptr;
        nix::Value * at = along[query.length];
        if (at && (query.kind == '!' || query.kind == '='))
            state.forceValue(*at, pos);
        switch (query.kind) {
        case '?': answers += at ? '1' : '0'; break;
        case '!': answers += at && at->type() != nix::nNull ? '1' : '0'; break;
        case '=': answers += at && compat::isTrue(*at) ? '1' : '0'; break;
        default: writeValue(state, at, answers, pos);
        }
        if (query.endsGroup) {
            app.groupValues[group] = along[1];
            app.groupAnswers[group] = answers.substr(groupStart);
        }
    }
    return {std::move(answers), namesEnd};
}

/// The function applying plan `number` of `app`, made the first time it is asked for.
nix::Value & applier(nix::EvalState & state, Application & app, uint32_t number, compat::PrimOpPos pos)
{
    if (number < app.appliers.size() && app.appliers[number])
        return *app.appliers[number];
    auto code = callRust(state, pos, [&] { return optimize_plan_code(app.handle, number); });
    // All of them live on in closures: heap values, not stack ones.
    if (code.shape >= app.shapes.size() || !app.shapes[code.shape]) {
        auto shape = state.allocValue();
        state.eval(compat::parseExpression(state, std::string(code.source)), *shape);
        if (app.shapes.size() <= code.shape)
            app.shapes.resize(code.shape + 1, nullptr);
        app.shapes[code.shape] = shape;
    }
    auto info = state.allocValue();
    nix::parseJSON(state, std::string(code.info), *info);
    auto made = state.allocValue();
    state.callFunction(*app.shapes[code.shape], *info, *made, pos);
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
    app->groupAnswers.resize(factQueries().size());
    app->groupValues.resize(factQueries().size(), nullptr);
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

    auto facts = readFacts(state, *app, *base, pos);
    auto & answers = facts.first;
    auto namesEnd = facts.second;
    auto plan = [&] {
        auto bytes = reinterpret_cast<const uint8_t *>(answers.data());
        return callRust(state, pos, [&] {
            return optimize_plan(app->handle, rust::Slice<const uint8_t>(bytes, namesEnd),
                rust::Slice<const uint8_t>(bytes + namesEnd, answers.size() - namesEnd));
        });
    };
    auto planned = plan();
    if (!planned.override_switches.empty()) {
        auto switches = state.allocValue(), overrideFactsOf = state.allocValue(), overrideFacts = state.allocValue();
        nix::parseJSON(state, std::string(planned.override_switches), *switches);
        state.callFunction(glueFunction(state, "overrideFacts", pos), *switches, *overrideFactsOf, pos);
        state.callFunction(*overrideFactsOf, *base, *overrideFacts, pos);
        writeValue(state, overrideFacts, answers, pos);
        planned = plan();
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
