// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.30;

import {Test} from "../utils/Test.sol";
import {ServiceRegistryHandler} from "./ServiceRegistryHandler.sol";
import {IServiceRegistry} from "../../contracts/interfaces/IServiceRegistry.sol";

/// @dev Invariants of the registry under arbitrary sequences of calls by arbitrary actors
/// (see ServiceRegistryHandler). Runs and depth are set in foundry.toml ([invariant]).
contract ServiceRegistryInvariantTest is Test {
    ServiceRegistryHandler internal handler;

    function setUp() public {
        handler = new ServiceRegistryHandler();
        targetContract(address(handler));
    }

    function invariant_EpochNeverDecreases() public view {
        vm.assertFalse(handler.epochDecreased(), "an epoch went down");
        for (uint256 i = 0; i < 2; i++) {
            bytes32 id = handler.ids(i);
            vm.assertGe(
                uint256(handler.registry().getHeader(id).epoch),
                uint256(handler.maxEpochSeen(id)),
                "epoch below one already observed"
            );
        }
    }

    function invariant_BackupIndexNeverDecreases() public view {
        vm.assertFalse(handler.backupIndexDecreased(), "a recorded backup index went down");
    }

    function invariant_OnlyManagerOrOperatorRecordedBackups() public view {
        vm.assertFalse(handler.unauthorizedBackup(), "a backup recorded by someone not allowed to");
    }

    function invariant_NoOperatorSurvivesAManagerTransfer() public view {
        vm.assertFalse(handler.operatorSurvivedTransfer(), "an operator of the previous manager is still allowed");
    }

    function invariant_OnlyManagerOrOperatorChangedLocation() public view {
        vm.assertFalse(handler.unauthorizedLocationChange(), "location changed by someone not allowed to");
    }

    function invariant_OnlyManagerChangedBodyOrState() public view {
        vm.assertFalse(handler.unauthorizedBodyOrStateChange(), "body or state changed by someone not the manager");
    }

    function invariant_RegisteredServicesNeverReturnToNone() public view {
        for (uint256 i = 0; i < 2; i++) {
            (,, IServiceRegistry.State state) = handler.registry().getServiceLocation(handler.ids(i));
            vm.assertTrue(state != IServiceRegistry.State.None, "service lost its registration");
        }
    }

    /// @dev Guards against a vacuous handler: every action, called by an authorised actor,
    /// must really reach the registry and succeed. (Actors: 0 and 1 manage services 0 and
    /// 1; 2 and 3 are their operators.)
    function test_HandlerActionsSucceedWhenAuthorised() public {
        handler.updateLocation(0, 2, 0, false); // operator of service 0
        handler.updateLocation(1, 1, 5, false); // manager of service 1
        handler.setOperator(0, 0, 4, true);
        handler.setState(1, 1, 2);
        handler.setRecoveryInfo(0, 0, 3, keccak256("digest"));
        handler.transferManager(1, 1, 4);
        handler.acceptManager(1, 4);
        handler.sendClaim(0, 4);
        handler.resetLocation(0, 0, 0);
        handler.recordBackup(0, 2, 7, false); // operator of service 0
        handler.recordBackup(1, 4, 3, false); // the new manager of service 1
        handler.resetBackup(1, 4);

        bytes4[10] memory selectors = [
            IServiceRegistry.updateLocation.selector,
            IServiceRegistry.setOperator.selector,
            IServiceRegistry.setState.selector,
            IServiceRegistry.setRecoveryInfo.selector,
            IServiceRegistry.transferManager.selector,
            IServiceRegistry.acceptManager.selector,
            IServiceRegistry.sendClaim.selector,
            IServiceRegistry.resetLocation.selector,
            IServiceRegistry.recordBackup.selector,
            IServiceRegistry.resetBackup.selector
        ];
        for (uint256 i = 0; i < selectors.length; i++) {
            vm.assertGe(handler.successes(selectors[i]), 1, "an authorised handler action did not succeed");
        }
        vm.assertEq(handler.successes(IServiceRegistry.updateLocation.selector), 2, "both publications");
        vm.assertEq(handler.registry().getHeader(handler.ids(1)).manager, address(0xE71), "transfer accepted");
        vm.assertFalse(handler.registry().isOperator(handler.ids(1), address(0x0B2)), "its operator cleared");
        vm.assertEq(uint256(handler.registry().getHeader(handler.ids(0)).epoch), 0, "reset to 0");
        (uint64 backupIndex,,,) = handler.registry().getBackup(handler.ids(0));
        vm.assertEq(uint256(backupIndex), 8, "backup recorded");
        (backupIndex,,,) = handler.registry().getBackup(handler.ids(1));
        vm.assertEq(uint256(backupIndex), 0, "backup reset by the new manager");
    }
}
