// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.30;

import {Test} from "./utils/Test.sol";
import {ServiceRegistry} from "../contracts/ServiceRegistry.sol";
import {IServiceRegistry} from "../contracts/interfaces/IServiceRegistry.sol";

/// @dev Shared fixture: a registry with one registered service, `logserver`, managed by
/// `manager`, with `operator` allowed to publish locations.
abstract contract ServiceRegistryFixture is Test {
    uint64 internal constant COOLDOWN = 300;
    string internal constant NAME = "logserver";

    ServiceRegistry internal registry;
    bytes32 internal id;
    address internal manager = address(0xA11CE);
    address internal operator = address(0x0FE1);
    address internal stranger = address(0xBAD);
    address internal nextManager = address(0xB0B);

    function setUp() public virtual {
        vm.label(manager, "manager");
        vm.label(operator, "operator");
        vm.label(stranger, "stranger");
        vm.label(nextManager, "nextManager");
        vm.warp(1_700_000_000);
        registry = new ServiceRegistry(COOLDOWN);
        vm.prank(manager);
        id = registry.register(NAME, _body());
        vm.prank(manager);
        registry.setOperator(id, operator, true);
    }

    function _body() internal view returns (IServiceRegistry.Body memory) {
        return IServiceRegistry.Body({
            deployer: manager,
            context: "local",
            replicas: 3,
            containerRegistry: "http://127.0.0.1:5000",
            image: "br2k/logserver:0.1.0",
            imageDigest: keccak256("image")
        });
    }

    function _string(uint256 length) internal pure returns (string memory) {
        bytes memory b = new bytes(length);
        for (uint256 i = 0; i < length; i++) {
            b[i] = "a";
        }
        return string(b);
    }

    function _assertBody(IServiceRegistry.Body memory got, IServiceRegistry.Body memory want) internal pure {
        vm.assertEq(got.deployer, want.deployer, "deployer");
        vm.assertEq(got.context, want.context, "context");
        vm.assertEq(uint256(got.replicas), uint256(want.replicas), "replicas");
        vm.assertEq(got.containerRegistry, want.containerRegistry, "containerRegistry");
        vm.assertEq(got.image, want.image, "image");
        vm.assertEq(got.imageDigest, want.imageDigest, "imageDigest");
    }
}

contract ServiceRegistryTest is ServiceRegistryFixture {
    // ---------------------------------------------------------------- register

    function test_Register() public {
        IServiceRegistry.Body memory body = _body();
        bytes32 expected = keccak256(bytes("other"));

        vm.expectEmit(address(registry));
        emit IServiceRegistry.ServiceRegistered(expected, "other", stranger);
        vm.expectEmit(address(registry));
        emit IServiceRegistry.StateChanged(expected, IServiceRegistry.State.Registered);
        vm.expectEmit(address(registry));
        emit IServiceRegistry.ManagerTransferred(expected, address(0), stranger);
        vm.expectEmit(address(registry));
        emit IServiceRegistry.RecoveryInfoUpdated(expected);
        vm.prank(stranger);
        bytes32 got = registry.register("other", body);

        vm.assertEq(got, expected, "id is keccak256(name)");
        IServiceRegistry.Header memory header = registry.getHeader(got);
        vm.assertEq(header.manager, stranger, "caller becomes manager");
        vm.assertEq(uint256(header.state), uint256(IServiceRegistry.State.Registered), "state");
        vm.assertEq(uint256(header.epoch), 0, "epoch starts at 0");
        vm.assertEq(header.location, "", "no location yet");
        vm.assertEq(uint256(header.updatedAt), block.timestamp, "updatedAt");
        _assertBody(registry.getRecoveryInfo(got), body);
    }

    function test_RevertWhen_RegisterEmptyName() public {
        vm.expectRevert(abi.encodeWithSelector(IServiceRegistry.ServiceRegistryEmptyName.selector));
        registry.register("", _body());
    }

    function test_RevertWhen_RegisterNameTooLong() public {
        uint256 max = registry.MAX_NAME_LENGTH();
        registry.register(_string(max), _body()); // the limit itself is fine
        vm.expectRevert(abi.encodeWithSelector(IServiceRegistry.ServiceRegistryTooLong.selector, max + 1, max));
        registry.register(_string(max + 1), _body());
    }

    function test_RevertWhen_RegisterTwice() public {
        vm.expectRevert(abi.encodeWithSelector(IServiceRegistry.ServiceRegistryAlreadyRegistered.selector, id));
        vm.prank(stranger);
        registry.register(NAME, _body());
    }

    function test_RevertWhen_RegisterBodyFieldTooLong() public {
        uint256 max = registry.MAX_BODY_FIELD_LENGTH();
        bytes memory tooLong = abi.encodeWithSelector(IServiceRegistry.ServiceRegistryTooLong.selector, max + 1, max);
        IServiceRegistry.Body memory body = _body();

        body.context = _string(max + 1);
        vm.expectRevert(tooLong);
        registry.register("a", body);

        body = _body();
        body.containerRegistry = _string(max + 1);
        vm.expectRevert(tooLong);
        registry.register("a", body);

        body = _body();
        body.image = _string(max + 1);
        vm.expectRevert(tooLong);
        registry.register("a", body);
    }

    function testFuzz_Register(string calldata name) public {
        uint256 length = bytes(name).length;
        vm.assume(length > 0 && length <= registry.MAX_NAME_LENGTH());
        vm.assume(keccak256(bytes(name)) != id);
        vm.prank(stranger);
        bytes32 got = registry.register(name, _body());
        vm.assertEq(got, keccak256(bytes(name)), "id");
        vm.assertEq(got, registry.serviceId(name), "serviceId agrees");
        vm.assertEq(registry.getHeader(got).manager, stranger, "manager");
    }

    // ---------------------------------------------------------------- recovery info

    function test_SetRecoveryInfo() public {
        IServiceRegistry.Body memory body = _body();
        body.replicas = 5;
        body.context = "prod-cluster";
        body.imageDigest = keccak256("image v2");

        vm.expectEmit(address(registry));
        emit IServiceRegistry.RecoveryInfoUpdated(id);
        vm.prank(manager);
        registry.setRecoveryInfo(id, body);

        _assertBody(registry.getRecoveryInfo(id), body);
    }

    function test_RevertWhen_SetRecoveryInfoNotManager() public {
        vm.expectRevert(abi.encodeWithSelector(IServiceRegistry.ServiceRegistryNotManager.selector, id, operator));
        vm.prank(operator);
        registry.setRecoveryInfo(id, _body());
    }

    function test_RevertWhen_SetRecoveryInfoUnknownService() public {
        bytes32 unknown = keccak256("unknown");
        vm.expectRevert(abi.encodeWithSelector(IServiceRegistry.ServiceRegistryUnknownService.selector, unknown));
        vm.prank(manager);
        registry.setRecoveryInfo(unknown, _body());
    }

    function test_RevertWhen_SetRecoveryInfoFieldTooLong() public {
        uint256 max = registry.MAX_BODY_FIELD_LENGTH();
        IServiceRegistry.Body memory body = _body();
        body.image = _string(max + 1);
        vm.expectRevert(abi.encodeWithSelector(IServiceRegistry.ServiceRegistryTooLong.selector, max + 1, max));
        vm.prank(manager);
        registry.setRecoveryInfo(id, body);
    }

    function test_GetRecoveryInfo() public view {
        _assertBody(registry.getRecoveryInfo(id), _body());
    }

    function test_RevertWhen_GetRecoveryInfoUnknownService() public {
        bytes32 unknown = keccak256("unknown");
        vm.expectRevert(abi.encodeWithSelector(IServiceRegistry.ServiceRegistryUnknownService.selector, unknown));
        registry.getRecoveryInfo(unknown);
    }

    // ---------------------------------------------------------------- operators

    function test_SetOperator() public {
        vm.assertFalse(registry.isOperator(id, stranger), "not yet");

        vm.expectEmit(address(registry));
        emit IServiceRegistry.OperatorSet(id, stranger, true);
        vm.prank(manager);
        registry.setOperator(id, stranger, true);
        vm.assertTrue(registry.isOperator(id, stranger), "allowed");

        vm.expectEmit(address(registry));
        emit IServiceRegistry.OperatorSet(id, stranger, false);
        vm.prank(manager);
        registry.setOperator(id, stranger, false);
        vm.assertFalse(registry.isOperator(id, stranger), "disallowed");
    }

    function test_RevertWhen_SetOperatorNotManager() public {
        vm.expectRevert(abi.encodeWithSelector(IServiceRegistry.ServiceRegistryNotManager.selector, id, operator));
        vm.prank(operator);
        registry.setOperator(id, stranger, true);
    }

    function test_RevertWhen_SetOperatorZeroAddress() public {
        vm.expectRevert(abi.encodeWithSelector(IServiceRegistry.ServiceRegistryZeroAddress.selector));
        vm.prank(manager);
        registry.setOperator(id, address(0), true);
    }

    function test_RevertWhen_SetOperatorUnknownService() public {
        bytes32 unknown = keccak256("unknown");
        vm.expectRevert(abi.encodeWithSelector(IServiceRegistry.ServiceRegistryUnknownService.selector, unknown));
        vm.prank(manager);
        registry.setOperator(unknown, stranger, true);
    }

    function test_OperatorsAreScopedToTheirService() public {
        vm.prank(stranger);
        bytes32 other = registry.register("other", _body());
        vm.expectRevert(
            abi.encodeWithSelector(IServiceRegistry.ServiceRegistryNotManagerOrOperator.selector, other, operator)
        );
        vm.prank(operator);
        registry.updateLocation(other, "http://10.0.0.1:8080", 1);
    }

    // ---------------------------------------------------------------- updateLocation

    function test_UpdateLocationByOperator() public {
        vm.warp(1_700_000_100);
        vm.expectEmit(address(registry));
        emit IServiceRegistry.NewLocation(id, "http://10.0.0.7:8080", 7);
        vm.prank(operator);
        registry.updateLocation(id, "http://10.0.0.7:8080", 7);

        IServiceRegistry.Header memory header = registry.getHeader(id);
        vm.assertEq(header.location, "http://10.0.0.7:8080", "location");
        vm.assertEq(uint256(header.epoch), 7, "epoch");
        vm.assertEq(uint256(header.updatedAt), 1_700_000_100, "updatedAt");
        vm.assertEq(uint256(header.state), uint256(IServiceRegistry.State.Registered), "state untouched");
    }

    function test_UpdateLocationByManager() public {
        vm.prank(manager);
        registry.updateLocation(id, "http://10.0.0.8:8080", 1);
        (string memory location, uint64 epoch,) = registry.getServiceLocation(id);
        vm.assertEq(location, "http://10.0.0.8:8080", "location");
        vm.assertEq(uint256(epoch), 1, "epoch");
    }

    function test_UpdateLocationLongLocation() public {
        // More than 31 bytes leaves the short-string slot; rewriting it short must not
        // leave garbage behind.
        string memory long = _string(registry.MAX_LOCATION_LENGTH());
        vm.prank(operator);
        registry.updateLocation(id, long, 1);
        (string memory location,,) = registry.getServiceLocation(id);
        vm.assertEq(location, long, "long location");
        vm.prank(operator);
        registry.updateLocation(id, "http://a:1", 2);
        (location,,) = registry.getServiceLocation(id);
        vm.assertEq(location, "http://a:1", "short again");
    }

    function test_RevertWhen_UpdateLocationStaleEpoch() public {
        vm.prank(operator);
        registry.updateLocation(id, "http://10.0.0.7:8080", 5);

        // The same epoch is stale: it is the leader that already published.
        vm.expectRevert(abi.encodeWithSelector(IServiceRegistry.ServiceRegistryStaleEpoch.selector, id, 5, 5));
        vm.prank(operator);
        registry.updateLocation(id, "http://10.0.0.9:8080", 5);

        // A lower epoch is a demoted leader publishing late.
        vm.expectRevert(abi.encodeWithSelector(IServiceRegistry.ServiceRegistryStaleEpoch.selector, id, 4, 5));
        vm.prank(manager);
        registry.updateLocation(id, "http://10.0.0.9:8080", 4);

        (string memory location, uint64 epoch,) = registry.getServiceLocation(id);
        vm.assertEq(location, "http://10.0.0.7:8080", "location kept");
        vm.assertEq(uint256(epoch), 5, "epoch kept");
    }

    function test_RevertWhen_UpdateLocationEpochZero() public {
        vm.expectRevert(abi.encodeWithSelector(IServiceRegistry.ServiceRegistryStaleEpoch.selector, id, 0, 0));
        vm.prank(operator);
        registry.updateLocation(id, "http://10.0.0.7:8080", 0);
    }

    function test_RevertWhen_UpdateLocationNotManagerOrOperator() public {
        vm.expectRevert(
            abi.encodeWithSelector(IServiceRegistry.ServiceRegistryNotManagerOrOperator.selector, id, stranger)
        );
        vm.prank(stranger);
        registry.updateLocation(id, "http://evil:80", 1);
    }

    function test_RevertWhen_UpdateLocationOperatorRemoved() public {
        vm.prank(manager);
        registry.setOperator(id, operator, false);
        vm.expectRevert(
            abi.encodeWithSelector(IServiceRegistry.ServiceRegistryNotManagerOrOperator.selector, id, operator)
        );
        vm.prank(operator);
        registry.updateLocation(id, "http://10.0.0.7:8080", 1);
    }

    function test_RevertWhen_UpdateLocationUnknownService() public {
        bytes32 unknown = keccak256("unknown");
        vm.expectRevert(abi.encodeWithSelector(IServiceRegistry.ServiceRegistryUnknownService.selector, unknown));
        vm.prank(operator);
        registry.updateLocation(unknown, "http://10.0.0.7:8080", 1);
    }

    function test_RevertWhen_UpdateLocationEmpty() public {
        vm.expectRevert(abi.encodeWithSelector(IServiceRegistry.ServiceRegistryEmptyLocation.selector, id));
        vm.prank(operator);
        registry.updateLocation(id, "", 1);
    }

    function test_RevertWhen_UpdateLocationTooLong() public {
        uint256 max = registry.MAX_LOCATION_LENGTH();
        vm.expectRevert(abi.encodeWithSelector(IServiceRegistry.ServiceRegistryTooLong.selector, max + 1, max));
        vm.prank(operator);
        registry.updateLocation(id, _string(max + 1), 1);
    }

    function testFuzz_UpdateLocation(uint64 first, uint64 second) public {
        first = uint64(bound(first, 1, type(uint64).max));
        vm.prank(operator);
        registry.updateLocation(id, "http://first:1", first);

        if (second <= first) {
            vm.expectRevert(
                abi.encodeWithSelector(IServiceRegistry.ServiceRegistryStaleEpoch.selector, id, second, first)
            );
        }
        vm.prank(operator);
        registry.updateLocation(id, "http://second:2", second);

        (string memory location, uint64 epoch,) = registry.getServiceLocation(id);
        vm.assertEq(uint256(epoch), second > first ? second : first, "epoch is the max accepted");
        vm.assertEq(location, second > first ? "http://second:2" : "http://first:1", "location follows epoch");
    }

    function testFuzz_UpdateLocationOnlyManagerOrOperator(address caller) public {
        vm.assume(caller != manager && caller != operator);
        vm.expectRevert(
            abi.encodeWithSelector(IServiceRegistry.ServiceRegistryNotManagerOrOperator.selector, id, caller)
        );
        vm.prank(caller);
        registry.updateLocation(id, "http://x:1", 1);
    }

    // ---------------------------------------------------------------- getServiceLocation

    // ---------------------------------------------------------------- recordBackup

    string internal constant ARTIFACT = "127.0.0.1:5000/logserver@sha256:ab";

    function test_GetBackupBeforeAnyIsZero() public view {
        (uint64 index, bytes32 digest, string memory artifact, uint64 recordedAt) = registry.getBackup(id);
        vm.assertEq(uint256(index), 0, "index");
        vm.assertEq(digest, bytes32(0), "digest");
        vm.assertEq(artifact, "", "artifact");
        vm.assertEq(uint256(recordedAt), 0, "recordedAt");
    }

    function test_RecordBackupByOperator() public {
        vm.expectEmit(address(registry));
        emit IServiceRegistry.BackupRecorded(id, 100, keccak256("b1"));
        vm.prank(operator);
        registry.recordBackup(id, 100, keccak256("b1"), ARTIFACT);

        (uint64 index, bytes32 digest, string memory artifact, uint64 recordedAt) = registry.getBackup(id);
        vm.assertEq(uint256(index), 100, "index");
        vm.assertEq(digest, keccak256("b1"), "digest");
        vm.assertEq(artifact, ARTIFACT, "artifact");
        vm.assertEq(uint256(recordedAt), block.timestamp, "recordedAt");
    }

    function test_RecordBackupByManager() public {
        vm.prank(manager);
        registry.recordBackup(id, 1, keccak256("b1"), ARTIFACT);
        (uint64 index,,,) = registry.getBackup(id);
        vm.assertEq(uint256(index), 1, "index");
    }

    function test_RevertWhen_RecordBackupStale() public {
        vm.prank(operator);
        registry.recordBackup(id, 100, keccak256("b1"), ARTIFACT);
        for (uint64 stale = 99; stale <= 100; stale++) {
            vm.expectRevert(
                abi.encodeWithSelector(IServiceRegistry.ServiceRegistryStaleBackup.selector, id, stale, uint64(100))
            );
            vm.prank(operator);
            registry.recordBackup(id, stale, keccak256("b0"), ARTIFACT);
        }
        (, bytes32 digest,,) = registry.getBackup(id);
        vm.assertEq(digest, keccak256("b1"), "the newer backup stays");
    }

    function test_RevertWhen_RecordBackupIndexZero() public {
        vm.expectRevert(abi.encodeWithSelector(IServiceRegistry.ServiceRegistryStaleBackup.selector, id, 0, 0));
        vm.prank(operator);
        registry.recordBackup(id, 0, keccak256("b1"), ARTIFACT);
    }

    function test_RevertWhen_RecordBackupNotManagerOrOperator() public {
        vm.expectRevert(
            abi.encodeWithSelector(IServiceRegistry.ServiceRegistryNotManagerOrOperator.selector, id, stranger)
        );
        vm.prank(stranger);
        registry.recordBackup(id, 1, keccak256("b1"), ARTIFACT);
    }

    function test_RevertWhen_RecordBackupByAClearedOperator() public {
        vm.prank(manager);
        registry.transferManager(id, nextManager);
        vm.prank(nextManager);
        registry.acceptManager(id);
        vm.expectRevert(
            abi.encodeWithSelector(IServiceRegistry.ServiceRegistryNotManagerOrOperator.selector, id, operator)
        );
        vm.prank(operator);
        registry.recordBackup(id, 1, keccak256("b1"), ARTIFACT);
    }

    function test_RevertWhen_RecordBackupUnknownService() public {
        bytes32 unknown = keccak256("unknown");
        vm.expectRevert(abi.encodeWithSelector(IServiceRegistry.ServiceRegistryUnknownService.selector, unknown));
        vm.prank(operator);
        registry.recordBackup(unknown, 1, keccak256("b1"), ARTIFACT);
    }

    function test_RevertWhen_RecordBackupInvalid() public {
        vm.expectRevert(abi.encodeWithSelector(IServiceRegistry.ServiceRegistryInvalidBackup.selector, id));
        vm.prank(operator);
        registry.recordBackup(id, 1, bytes32(0), ARTIFACT);
        vm.expectRevert(abi.encodeWithSelector(IServiceRegistry.ServiceRegistryInvalidBackup.selector, id));
        vm.prank(operator);
        registry.recordBackup(id, 1, keccak256("b1"), "");
        vm.expectRevert(abi.encodeWithSelector(IServiceRegistry.ServiceRegistryTooLong.selector, 257, 256));
        vm.prank(operator);
        registry.recordBackup(id, 1, keccak256("b1"), _string(257));
    }

    function test_RevertWhen_GetBackupUnknownService() public {
        bytes32 unknown = keccak256("unknown");
        vm.expectRevert(abi.encodeWithSelector(IServiceRegistry.ServiceRegistryUnknownService.selector, unknown));
        registry.getBackup(unknown);
    }

    function testFuzz_RecordBackupIndexOnlyIncreases(uint64 first, uint64 second) public {
        vm.assume(first > 0);
        vm.prank(operator);
        registry.recordBackup(id, first, keccak256("first"), ARTIFACT);
        if (second <= first) {
            vm.expectRevert(
                abi.encodeWithSelector(IServiceRegistry.ServiceRegistryStaleBackup.selector, id, second, first)
            );
        }
        vm.prank(operator);
        registry.recordBackup(id, second, keccak256("second"), ARTIFACT);
        (uint64 index,,,) = registry.getBackup(id);
        vm.assertEq(uint256(index), second > first ? second : first, "the higher index wins");
    }

    function testFuzz_RecordBackupOnlyManagerOrOperator(address caller) public {
        vm.assume(caller != manager && caller != operator);
        vm.expectRevert(
            abi.encodeWithSelector(IServiceRegistry.ServiceRegistryNotManagerOrOperator.selector, id, caller)
        );
        vm.prank(caller);
        registry.recordBackup(id, 1, keccak256("b1"), ARTIFACT);
    }

    // ---------------------------------------------------------------- resetBackup

    function test_ResetBackupUnpinsAnIndexAtTheMaximum() public {
        // A compromised operator key records an index no leader can ever exceed.
        vm.prank(operator);
        registry.recordBackup(id, type(uint64).max, keccak256("pin"), "evil.example/x@sha256:00");
        vm.expectRevert(
            abi.encodeWithSelector(
                IServiceRegistry.ServiceRegistryStaleBackup.selector, id, uint64(500), type(uint64).max
            )
        );
        vm.prank(operator);
        registry.recordBackup(id, 500, keccak256("real"), ARTIFACT);

        vm.expectEmit(address(registry));
        emit IServiceRegistry.BackupReset(id, type(uint64).max);
        vm.prank(manager);
        registry.resetBackup(id);
        (uint64 index, bytes32 digest, string memory artifact, uint64 recordedAt) = registry.getBackup(id);
        vm.assertEq(uint256(index), 0, "index cleared");
        vm.assertEq(digest, bytes32(0), "digest cleared");
        vm.assertEq(bytes(artifact).length, 0, "artifact cleared");
        vm.assertEq(uint256(recordedAt), 0, "time cleared");

        // The leader's real record goes through again.
        vm.prank(operator);
        registry.recordBackup(id, 500, keccak256("real"), ARTIFACT);
        (index,,,) = registry.getBackup(id);
        vm.assertEq(uint256(index), 500, "recorded after the reset");
    }

    function test_RevertWhen_ResetBackupByAnOperatorOrStranger() public {
        vm.prank(operator);
        registry.recordBackup(id, 7, keccak256("b"), ARTIFACT);
        address[2] memory callers = [operator, stranger];
        for (uint256 i = 0; i < callers.length; i++) {
            vm.expectRevert(abi.encodeWithSelector(IServiceRegistry.ServiceRegistryNotManager.selector, id, callers[i]));
            vm.prank(callers[i]);
            registry.resetBackup(id);
        }
        (uint64 index,,,) = registry.getBackup(id);
        vm.assertEq(uint256(index), 7, "untouched");
    }

    function test_RevertWhen_ResetBackupUnknownService() public {
        bytes32 unknown = registry.serviceId("nope");
        vm.expectRevert(abi.encodeWithSelector(IServiceRegistry.ServiceRegistryUnknownService.selector, unknown));
        vm.prank(manager);
        registry.resetBackup(unknown);
    }

    function test_AcceptManagerClearsTheBackupRecord() public {
        vm.prank(operator);
        registry.recordBackup(id, type(uint64).max, keccak256("pin"), ARTIFACT);
        vm.prank(manager);
        registry.transferManager(id, nextManager);
        vm.expectEmit(address(registry));
        emit IServiceRegistry.BackupReset(id, type(uint64).max);
        vm.prank(nextManager);
        registry.acceptManager(id);
        (uint64 index, bytes32 digest,,) = registry.getBackup(id);
        vm.assertEq(uint256(index), 0, "the old operators' record is gone");
        vm.assertEq(digest, bytes32(0), "digest cleared");
    }

    function testFuzz_ResetBackupAlwaysLetsTheNextRecordThrough(uint64 pinned, uint64 next) public {
        vm.assume(pinned > 0 && next > 0);
        vm.prank(operator);
        registry.recordBackup(id, pinned, keccak256("pin"), ARTIFACT);
        vm.prank(manager);
        registry.resetBackup(id);
        vm.prank(operator);
        registry.recordBackup(id, next, keccak256("next"), ARTIFACT);
        (uint64 index,,,) = registry.getBackup(id);
        vm.assertEq(uint256(index), uint256(next), "any index is accepted after a reset");
    }

    // ---------------------------------------------------------------- resetLocation

    function test_ResetLocationUnsticksAnEpochAtTheMaximum() public {
        // A compromised operator key publishes an epoch no leader can ever exceed.
        vm.prank(operator);
        registry.updateLocation(id, "http://evil:1", type(uint64).max);
        vm.expectRevert(
            abi.encodeWithSelector(IServiceRegistry.ServiceRegistryStaleEpoch.selector, id, uint64(7), type(uint64).max)
        );
        vm.prank(operator);
        registry.updateLocation(id, "http://10.0.0.7:8080", 7);

        vm.expectEmit(address(registry));
        emit IServiceRegistry.LocationReset(id, "http://10.0.0.7:8080", 6, type(uint64).max);
        vm.prank(manager);
        registry.resetLocation(id, "http://10.0.0.7:8080", 6);
        (string memory location, uint64 epoch,) = registry.getServiceLocation(id);
        vm.assertEq(location, "http://10.0.0.7:8080", "location");
        vm.assertEq(uint256(epoch), 6, "epoch lowered");

        // Leaders publish again as before.
        vm.prank(operator);
        registry.updateLocation(id, "http://10.0.0.8:8080", 7);
    }

    function test_RevertWhen_ResetLocationNotManager() public {
        vm.expectRevert(abi.encodeWithSelector(IServiceRegistry.ServiceRegistryNotManager.selector, id, operator));
        vm.prank(operator);
        registry.resetLocation(id, "http://10.0.0.7:8080", 0);
    }

    function test_RevertWhen_ResetLocationEmptyOrTooLong() public {
        vm.expectRevert(abi.encodeWithSelector(IServiceRegistry.ServiceRegistryEmptyLocation.selector, id));
        vm.prank(manager);
        registry.resetLocation(id, "", 0);
        vm.expectRevert(abi.encodeWithSelector(IServiceRegistry.ServiceRegistryTooLong.selector, 257, 256));
        vm.prank(manager);
        registry.resetLocation(id, _string(257), 0);
    }

    function testFuzz_ResetLocationSetsAnyEpoch(uint64 before, uint64 next, address caller) public {
        vm.assume(before > 0);
        vm.prank(operator);
        registry.updateLocation(id, "http://10.0.0.1:8080", before);
        if (caller != manager) {
            vm.expectRevert(abi.encodeWithSelector(IServiceRegistry.ServiceRegistryNotManager.selector, id, caller));
        }
        vm.prank(caller);
        registry.resetLocation(id, "http://10.0.0.2:8080", next);
        (, uint64 epoch,) = registry.getServiceLocation(id);
        vm.assertEq(uint256(epoch), caller == manager ? next : before, "only the manager resets");
    }

    function test_GetServiceLocation() public {
        vm.prank(operator);
        registry.updateLocation(id, "http://10.0.0.7:8080", 3);
        vm.prank(manager);
        registry.setState(id, IServiceRegistry.State.Running);

        (string memory location, uint64 epoch, IServiceRegistry.State state) = registry.getServiceLocation(id);
        vm.assertEq(location, "http://10.0.0.7:8080", "location");
        vm.assertEq(uint256(epoch), 3, "epoch");
        vm.assertEq(uint256(state), uint256(IServiceRegistry.State.Running), "state");
    }

    function test_RevertWhen_GetServiceLocationUnknownService() public {
        bytes32 unknown = keccak256("unknown");
        vm.expectRevert(abi.encodeWithSelector(IServiceRegistry.ServiceRegistryUnknownService.selector, unknown));
        registry.getServiceLocation(unknown);
    }

    // ---------------------------------------------------------------- sendClaim

    function test_SendClaim() public {
        vm.expectEmit(address(registry));
        emit IServiceRegistry.Claim(id, stranger, "no answer for 30 s");
        vm.prank(stranger);
        registry.sendClaim(id, "no answer for 30 s");
        vm.assertEq(uint256(registry.nextClaimAt(id, stranger)), block.timestamp + COOLDOWN, "cooldown recorded");
    }

    function test_SendClaimAfterCooldown() public {
        vm.prank(stranger);
        registry.sendClaim(id, "down");
        vm.warp(block.timestamp + COOLDOWN);
        vm.expectEmit(address(registry));
        emit IServiceRegistry.Claim(id, stranger, "still down");
        vm.prank(stranger);
        registry.sendClaim(id, "still down");
    }

    function test_RevertWhen_SendClaimTooSoon() public {
        vm.prank(stranger);
        registry.sendClaim(id, "down");
        uint64 nextAt = uint64(block.timestamp + COOLDOWN);
        vm.warp(block.timestamp + COOLDOWN - 1);
        vm.expectRevert(
            abi.encodeWithSelector(IServiceRegistry.ServiceRegistryClaimTooSoon.selector, id, stranger, nextAt)
        );
        vm.prank(stranger);
        registry.sendClaim(id, "down again");
    }

    function test_SendClaimCooldownIsPerClaimantAndService() public {
        vm.prank(stranger);
        bytes32 other = registry.register("other", _body());
        vm.prank(stranger);
        registry.sendClaim(id, "down");
        // Another claimant on the same service, and the same claimant on another service,
        // are not held back by that claim.
        vm.prank(operator);
        registry.sendClaim(id, "down");
        vm.prank(stranger);
        registry.sendClaim(other, "down");
    }

    function test_RevertWhen_SendClaimUnknownService() public {
        bytes32 unknown = keccak256("unknown");
        vm.expectRevert(abi.encodeWithSelector(IServiceRegistry.ServiceRegistryUnknownService.selector, unknown));
        vm.prank(stranger);
        registry.sendClaim(unknown, "down");
    }

    function test_RevertWhen_SendClaimReasonTooLong() public {
        uint256 max = registry.MAX_REASON_LENGTH();
        vm.expectRevert(abi.encodeWithSelector(IServiceRegistry.ServiceRegistryTooLong.selector, max + 1, max));
        vm.prank(stranger);
        registry.sendClaim(id, _string(max + 1));
    }

    function testFuzz_SendClaimCooldown(uint256 wait) public {
        wait = bound(wait, 0, 10 * COOLDOWN);
        vm.prank(stranger);
        registry.sendClaim(id, "down");
        uint64 nextAt = uint64(block.timestamp + COOLDOWN);
        vm.warp(block.timestamp + wait);
        if (wait < COOLDOWN) {
            vm.expectRevert(
                abi.encodeWithSelector(IServiceRegistry.ServiceRegistryClaimTooSoon.selector, id, stranger, nextAt)
            );
        }
        vm.prank(stranger);
        registry.sendClaim(id, "down");
    }

    // ---------------------------------------------------------------- setState

    function test_SetState() public {
        vm.warp(1_700_000_500);
        vm.expectEmit(address(registry));
        emit IServiceRegistry.StateChanged(id, IServiceRegistry.State.Recovering);
        vm.prank(manager);
        registry.setState(id, IServiceRegistry.State.Recovering);
        IServiceRegistry.Header memory header = registry.getHeader(id);
        vm.assertEq(uint256(header.state), uint256(IServiceRegistry.State.Recovering), "state");
        vm.assertEq(uint256(header.updatedAt), 1_700_000_500, "updatedAt");
    }

    function test_RevertWhen_SetStateNone() public {
        vm.expectRevert(
            abi.encodeWithSelector(IServiceRegistry.ServiceRegistryInvalidState.selector, IServiceRegistry.State.None)
        );
        vm.prank(manager);
        registry.setState(id, IServiceRegistry.State.None);
    }

    function test_RevertWhen_SetStateNotManager() public {
        vm.expectRevert(abi.encodeWithSelector(IServiceRegistry.ServiceRegistryNotManager.selector, id, operator));
        vm.prank(operator);
        registry.setState(id, IServiceRegistry.State.Stopped);
    }

    function test_RevertWhen_SetStateUnknownService() public {
        bytes32 unknown = keccak256("unknown");
        vm.expectRevert(abi.encodeWithSelector(IServiceRegistry.ServiceRegistryUnknownService.selector, unknown));
        vm.prank(manager);
        registry.setState(unknown, IServiceRegistry.State.Running);
    }

    function testFuzz_SetState(uint8 raw) public {
        IServiceRegistry.State state = IServiceRegistry.State(bound(raw, 1, 4));
        vm.prank(manager);
        registry.setState(id, state);
        (,, IServiceRegistry.State got) = registry.getServiceLocation(id);
        vm.assertEq(uint256(got), uint256(state), "state");
    }

    // ---------------------------------------------------------------- manager transfer

    function test_TransferManager() public {
        vm.expectEmit(address(registry));
        emit IServiceRegistry.ManagerTransferStarted(id, manager, nextManager);
        vm.prank(manager);
        registry.transferManager(id, nextManager);

        vm.assertEq(registry.pendingManager(id), nextManager, "pending");
        vm.assertEq(registry.getHeader(id).manager, manager, "manager unchanged until accepted");
    }

    function test_TransferManagerCancel() public {
        vm.prank(manager);
        registry.transferManager(id, nextManager);
        vm.prank(manager);
        registry.transferManager(id, address(0));
        vm.assertEq(registry.pendingManager(id), address(0), "cancelled");
        vm.expectRevert(
            abi.encodeWithSelector(IServiceRegistry.ServiceRegistryNotPendingManager.selector, id, nextManager)
        );
        vm.prank(nextManager);
        registry.acceptManager(id);
    }

    function test_RevertWhen_TransferManagerNotManager() public {
        vm.expectRevert(abi.encodeWithSelector(IServiceRegistry.ServiceRegistryNotManager.selector, id, nextManager));
        vm.prank(nextManager);
        registry.transferManager(id, nextManager);
    }

    function test_RevertWhen_TransferManagerUnknownService() public {
        bytes32 unknown = keccak256("unknown");
        vm.expectRevert(abi.encodeWithSelector(IServiceRegistry.ServiceRegistryUnknownService.selector, unknown));
        vm.prank(manager);
        registry.transferManager(unknown, nextManager);
    }

    function test_AcceptManager() public {
        vm.prank(manager);
        registry.transferManager(id, nextManager);

        vm.expectEmit(address(registry));
        emit IServiceRegistry.ManagerTransferred(id, manager, nextManager);
        vm.prank(nextManager);
        registry.acceptManager(id);

        vm.assertEq(registry.getHeader(id).manager, nextManager, "new manager");
        vm.assertEq(registry.pendingManager(id), address(0), "offer consumed");

        // The old manager has lost its rights, the new one has them.
        vm.expectRevert(abi.encodeWithSelector(IServiceRegistry.ServiceRegistryNotManager.selector, id, manager));
        vm.prank(manager);
        registry.setState(id, IServiceRegistry.State.Stopped);
        vm.prank(nextManager);
        registry.setState(id, IServiceRegistry.State.Stopped);
    }

    function test_AcceptManagerClearsTheOperators() public {
        vm.prank(manager);
        registry.transferManager(id, nextManager);
        vm.expectEmit(address(registry));
        emit IServiceRegistry.OperatorsCleared(id, 1);
        vm.prank(nextManager);
        registry.acceptManager(id);

        vm.assertFalse(registry.isOperator(id, operator), "the old manager's operator is gone");
        vm.expectRevert(
            abi.encodeWithSelector(IServiceRegistry.ServiceRegistryNotManagerOrOperator.selector, id, operator)
        );
        vm.prank(operator);
        registry.updateLocation(id, "http://10.0.0.9:8080", 1);

        // The new manager names its own operators, in the new set only.
        vm.prank(nextManager);
        registry.setOperator(id, stranger, true);
        vm.prank(stranger);
        registry.updateLocation(id, "http://10.0.0.9:8080", 1);
        vm.assertTrue(registry.isOperator(id, stranger), "new operator");
    }

    function testFuzz_AcceptManagerClearsEveryOperator(address[4] calldata operators) public {
        for (uint256 i = 0; i < operators.length; i++) {
            vm.assume(operators[i] != address(0));
            vm.prank(manager);
            registry.setOperator(id, operators[i], true);
        }
        vm.prank(manager);
        registry.transferManager(id, nextManager);
        vm.prank(nextManager);
        registry.acceptManager(id);
        for (uint256 i = 0; i < operators.length; i++) {
            vm.assertFalse(registry.isOperator(id, operators[i]), "an operator survived the transfer");
        }
    }

    function test_RevertWhen_AcceptManagerNotPending() public {
        vm.prank(manager);
        registry.transferManager(id, nextManager);
        vm.expectRevert(
            abi.encodeWithSelector(IServiceRegistry.ServiceRegistryNotPendingManager.selector, id, stranger)
        );
        vm.prank(stranger);
        registry.acceptManager(id);
    }

    function test_RevertWhen_AcceptManagerByZeroAddressWithoutOffer() public {
        // No offer is pending (pendingManager == 0); address(0) must not match it.
        vm.expectRevert(
            abi.encodeWithSelector(IServiceRegistry.ServiceRegistryNotPendingManager.selector, id, address(0))
        );
        vm.prank(address(0));
        registry.acceptManager(id);
    }

    function test_RevertWhen_AcceptManagerUnknownService() public {
        bytes32 unknown = keccak256("unknown");
        vm.expectRevert(abi.encodeWithSelector(IServiceRegistry.ServiceRegistryUnknownService.selector, unknown));
        vm.prank(nextManager);
        registry.acceptManager(unknown);
    }

    // ---------------------------------------------------------------- views

    function test_RevertWhen_GetHeaderUnknownService() public {
        bytes32 unknown = keccak256("unknown");
        vm.expectRevert(abi.encodeWithSelector(IServiceRegistry.ServiceRegistryUnknownService.selector, unknown));
        registry.getHeader(unknown);
    }

    function test_RevertWhen_PendingManagerUnknownService() public {
        bytes32 unknown = keccak256("unknown");
        vm.expectRevert(abi.encodeWithSelector(IServiceRegistry.ServiceRegistryUnknownService.selector, unknown));
        registry.pendingManager(unknown);
    }

    function test_ClaimCooldownIsConfigured() public view {
        vm.assertEq(uint256(registry.claimCooldown()), COOLDOWN, "cooldown");
    }

    // ---------------------------------------------------------------- gas of the hot path

    /// @dev Measures a leader's publication as it happens in production: an operator key,
    /// an existing service that already has a location, a location of at most 31 bytes.
    /// @dev A leader recording its backups: an operator key, the second and later records
    /// of a service (the slots already written once), a reference of about 90 bytes.
    function test_RecordBackupGas() public {
        string memory artifact =
            "registry.example:5000/br2k/logserver@sha256:0123456789abcdef0123456789abcdef0123456789abcd";
        vm.prank(operator);
        registry.recordBackup(id, 10_000, keccak256("b1"), artifact);
        vm.prank(operator);
        registry.recordBackup(id, 20_000, keccak256("b2"), artifact);
    }

    /// @dev The manager clearing a pinned record (an index and an artifact of about 90 bytes).
    function test_ResetBackupGas() public {
        string memory artifact =
            "registry.example:5000/br2k/logserver@sha256:0123456789abcdef0123456789abcdef0123456789abcd";
        vm.prank(operator);
        registry.recordBackup(id, type(uint64).max, keccak256("pin"), artifact);
        vm.prank(manager);
        registry.resetBackup(id);
    }

    /// @dev A new manager taking a service whose operators recorded a backup.
    function test_AcceptManagerWithABackupGas() public {
        vm.prank(operator);
        registry.recordBackup(id, 10_000, keccak256("b1"), ARTIFACT);
        vm.prank(manager);
        registry.transferManager(id, nextManager);
        vm.prank(nextManager);
        registry.acceptManager(id);
    }

    function test_UpdateLocationGasHotPath() public {
        vm.prank(operator);
        registry.updateLocation(id, "http://10.0.0.7:8080", 1);
        vm.prank(operator);
        registry.updateLocation(id, "http://10.0.0.8:8080", 2);
    }
}
