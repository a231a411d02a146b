// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.30;

import {CheatCodes} from "../test/utils/Test.sol";
import {ServiceRegistry} from "../contracts/ServiceRegistry.sol";

/// @notice Deploys the br2k ServiceRegistry.
/// @dev The signer comes from forge's own options (--private-key, --keystore, --account),
/// never from this file:
///
///     forge script script/Deploy.s.sol --rpc-url $ETH_RPC_URL --private-key $KEY --broadcast
///
/// BR2K_CLAIM_COOLDOWN (seconds, default 300) sets how long a claimant waits between two
/// claims for the same service.
contract Deploy is CheatCodes {
    uint256 internal constant DEFAULT_CLAIM_COOLDOWN = 300;

    function run() external returns (ServiceRegistry registry) {
        uint256 cooldown = vm.envOr("BR2K_CLAIM_COOLDOWN", DEFAULT_CLAIM_COOLDOWN);
        require(cooldown <= type(uint64).max, "BR2K_CLAIM_COOLDOWN does not fit in uint64 seconds");
        vm.startBroadcast();
        registry = new ServiceRegistry(uint64(cooldown));
        vm.stopBroadcast();
    }
}
