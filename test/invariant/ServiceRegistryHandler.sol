// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.30;

import {CheatCodes} from "../utils/Test.sol";
import {ServiceRegistry} from "../../contracts/ServiceRegistry.sol";
import {IServiceRegistry} from "../../contracts/interfaces/IServiceRegistry.sol";

/// @dev Drives the registry with every mutating function, called by any of a few actors
/// (managers, operators, strangers) on either of two services, authorised or not. Around
/// each call it snapshots both services and records any change the caller had no right
/// to make; the invariant test then asserts that no such change ever happened.
contract ServiceRegistryHandler is CheatCodes {
    ServiceRegistry public immutable registry;
    bytes32[2] public ids;
    address[5] internal actors;

    struct Snapshot {
        bytes32 location;
        uint64 epoch;
        IServiceRegistry.State state;
        bytes32 body;
        address manager;
        uint64 backupIndex;
        bytes32 backup;
    }

    /// Set when a service's epoch went down other than by its manager's `resetLocation`.
    bool public epochDecreased;
    /// Set when a previous manager's operator could still publish after a transfer.
    bool public operatorSurvivedTransfer;
    /// Set when a service's recorded backup index went down other than to 0 by its
    /// manager's `resetBackup` or a new manager's `acceptManager`.
    bool public backupIndexDecreased;
    /// Set when a backup was recorded by someone neither manager nor operator.
    bool public unauthorizedBackup;
    /// Set when a location or epoch changed although the caller was neither the service's
    /// manager nor one of its operators at the time of the call.
    bool public unauthorizedLocationChange;
    /// Set when a Body or state changed although the caller was not the service's manager.
    bool public unauthorizedBodyOrStateChange;
    /// Highest epoch ever observed per service.
    mapping(bytes32 id => uint64 epoch) public maxEpochSeen;
    /// Successful calls per function, so a run that exercised nothing is visible.
    mapping(bytes4 selector => uint256 count) public successes;

    constructor() {
        registry = new ServiceRegistry(60);
        actors = [address(0xA1), address(0xA2), address(0x0B1), address(0x0B2), address(0xE71)];
        IServiceRegistry.Body memory body;
        for (uint256 i = 0; i < 2; i++) {
            vm.prank(actors[i]);
            ids[i] = registry.register(i == 0 ? "alpha" : "beta", body);
            vm.prank(actors[i]);
            registry.setOperator(ids[i], actors[2 + i], true);
        }
    }

    function updateLocation(uint256 serviceSeed, uint256 actorSeed, uint64 epochDelta, bool stale) external {
        bytes32 id = _service(serviceSeed);
        uint64 current = registry.getHeader(id).epoch;
        // Mostly plausible epochs (just above the current one), sometimes stale ones.
        uint64 epoch = stale ? current - uint64(_bound(epochDelta, 0, current)) : current + 1 + (epochDelta % 4);
        string memory location = string.concat("http://10.0.0.", vm.toString(uint256(epochDelta % 250)), ":8080");
        _call(actorSeed, abi.encodeCall(IServiceRegistry.updateLocation, (id, location, epoch)));
    }

    function setOperator(uint256 serviceSeed, uint256 actorSeed, uint256 operatorSeed, bool allowed) external {
        bytes32 id = _service(serviceSeed);
        address operator = actors[operatorSeed % actors.length];
        _call(actorSeed, abi.encodeCall(IServiceRegistry.setOperator, (id, operator, allowed)));
    }

    function setState(uint256 serviceSeed, uint256 actorSeed, uint8 state) external {
        bytes32 id = _service(serviceSeed);
        state = uint8(_bound(state, 0, 4));
        _call(actorSeed, abi.encodeCall(IServiceRegistry.setState, (id, IServiceRegistry.State(state))));
    }

    function setRecoveryInfo(uint256 serviceSeed, uint256 actorSeed, uint32 replicas, bytes32 digest) external {
        bytes32 id = _service(serviceSeed);
        IServiceRegistry.Body memory body = IServiceRegistry.Body({
            deployer: actors[actorSeed % actors.length],
            context: "local",
            replicas: replicas,
            containerRegistry: "http://127.0.0.1:5000",
            image: "br2k/app:1",
            imageDigest: digest
        });
        _call(actorSeed, abi.encodeCall(IServiceRegistry.setRecoveryInfo, (id, body)));
    }

    function transferManager(uint256 serviceSeed, uint256 actorSeed, uint256 nextSeed) external {
        bytes32 id = _service(serviceSeed);
        address next = actors[nextSeed % actors.length];
        _call(actorSeed, abi.encodeCall(IServiceRegistry.transferManager, (id, next)));
    }

    function acceptManager(uint256 serviceSeed, uint256 actorSeed) external {
        bytes32 id = _service(serviceSeed);
        address previous = registry.getHeader(id).manager;
        _call(actorSeed, abi.encodeCall(IServiceRegistry.acceptManager, (id)));
        if (registry.getHeader(id).manager == previous) return;
        for (uint256 i = 0; i < actors.length; i++) {
            if (registry.isOperator(id, actors[i])) operatorSurvivedTransfer = true;
        }
    }

    function recordBackup(uint256 serviceSeed, uint256 actorSeed, uint64 indexDelta, bool stale) external {
        bytes32 id = _service(serviceSeed);
        (uint64 current,,,) = registry.getBackup(id);
        uint64 index = stale ? current - uint64(_bound(indexDelta, 0, current)) : current + 1 + (indexDelta % 1000);
        bytes32 digest = keccak256(abi.encode(index, indexDelta));
        _call(actorSeed, abi.encodeCall(IServiceRegistry.recordBackup, (id, index, digest, "oci.example/app@sha256:x")));
    }

    function resetBackup(uint256 serviceSeed, uint256 actorSeed) external {
        _call(actorSeed, abi.encodeCall(IServiceRegistry.resetBackup, (_service(serviceSeed))));
    }

    function resetLocation(uint256 serviceSeed, uint256 actorSeed, uint64 epoch) external {
        bytes32 id = _service(serviceSeed);
        _call(actorSeed, abi.encodeCall(IServiceRegistry.resetLocation, (id, "http://10.0.0.1:8080", epoch)));
    }

    function sendClaim(uint256 serviceSeed, uint256 actorSeed) external {
        _call(actorSeed, abi.encodeCall(IServiceRegistry.sendClaim, (_service(serviceSeed), "down")));
    }

    function warp(uint256 seconds_) external {
        vm.warp(block.timestamp + _bound(seconds_, 1, 600));
    }

    /// @dev Calls the registry as a chosen actor and checks what changed against what
    /// that actor was allowed to change when the call began.
    function _call(uint256 actorSeed, bytes memory data) private {
        address actor = actors[actorSeed % actors.length];
        Snapshot[2] memory before = [_snapshot(ids[0]), _snapshot(ids[1])];
        bool[2] memory wasOperator = [registry.isOperator(ids[0], actor), registry.isOperator(ids[1], actor)];

        vm.prank(actor);
        (bool ok,) = address(registry).call(data);
        if (ok) successes[bytes4(data)]++;

        for (uint256 i = 0; i < 2; i++) {
            Snapshot memory after_ = _snapshot(ids[i]);
            Snapshot memory prior = before[i];
            bool isManager = actor == prior.manager;
            bool reset = bytes4(data) == IServiceRegistry.resetLocation.selector && isManager;
            if (after_.epoch < prior.epoch && !reset) epochDecreased = true;
            // A manager's reset starts the epoch's history again.
            if (after_.epoch > maxEpochSeen[ids[i]] || reset) maxEpochSeen[ids[i]] = after_.epoch;
            bool locationChanged = after_.location != prior.location || after_.epoch != prior.epoch;
            if (locationChanged && !isManager && !wasOperator[i]) unauthorizedLocationChange = true;
            bool bodyOrStateChanged = after_.body != prior.body || after_.state != prior.state;
            if (bodyOrStateChanged && !isManager) unauthorizedBodyOrStateChange = true;
            // Only the manager's reset, or a new manager taking the service, clears a record.
            // (A manager may offer the service to itself: accepting still clears the record.)
            bool tookOver = ok && bytes4(data) == IServiceRegistry.acceptManager.selector;
            bool cleared = after_.backupIndex == 0
                && (isManager && bytes4(data) == IServiceRegistry.resetBackup.selector || tookOver);
            if (after_.backupIndex < prior.backupIndex && !cleared) backupIndexDecreased = true;
            if (after_.backup != prior.backup && !isManager && !wasOperator[i] && !cleared) {
                unauthorizedBackup = true;
            }
        }
    }

    function _snapshot(bytes32 id) private view returns (Snapshot memory s) {
        IServiceRegistry.Header memory header = registry.getHeader(id);
        s.location = keccak256(bytes(header.location));
        s.epoch = header.epoch;
        s.state = header.state;
        s.manager = header.manager;
        s.body = keccak256(abi.encode(registry.getRecoveryInfo(id)));
        (uint64 index, bytes32 digest, string memory artifact, uint64 recordedAt) = registry.getBackup(id);
        s.backupIndex = index;
        s.backup = keccak256(abi.encode(index, digest, artifact, recordedAt));
    }

    function _service(uint256 seed) private view returns (bytes32) {
        return ids[seed % 2];
    }

    function _bound(uint256 x, uint256 min, uint256 max) private pure returns (uint256) {
        return min + (x % (max - min + 1));
    }
}
