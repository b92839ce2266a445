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
std::string callRust(compat::PrimOpPos pos, Call && call)
{
    try {
        return std::string(call());
    } catch (const rust::Error & e) {
        compat::throwEvalError(pos, e.what());
    }
}

void primHardwareProfile(nix::EvalState & state, compat::PrimOpPos pos, nix::Value **, nix::Value & v)
{
    // The setting is read here, not at load time: --option values are applied after plugins load.
    auto json = callRust(pos, [&] {
        return hardware_profile_json(settings().hardwareProfile.get(), compat::pureEval(state));
    });
    nix::parseJSON(state, json, v);
}

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
        // A plugin built against another Nix would meet a different C++ ABI: refuse politely.
        if (nix::nixVersion != NIX_TIER_BUILT_FOR_NIX) {
            nix::warn("nix-tier plugin was built for Nix %s but is loaded into Nix %s, so it registers "
                      "nothing; rebuild it against this Nix (./scripts/setup on Debian, or the flake "
                      "package built from this Nix)",
                NIX_TIER_BUILT_FOR_NIX, nix::nixVersion);
            return;
        }
        static nix::GlobalConfig::Register config(&settings());
        compat::registerPrimOp("__hardwareProfile", {}, 0, hardwareProfileDoc, primHardwareProfile);
    }
} registration;

} // namespace
} // namespace nix_tier
