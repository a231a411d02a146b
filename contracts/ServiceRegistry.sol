// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.30;

import {IServiceRegistry} from "./interfaces/IServiceRegistry.sol";

/// @title ServiceRegistry
/// @notice The br2k service registry (see IServiceRegistry and DESIGN.md §3).
/// @dev Storage is laid out for the hot path: a leader's `updateLocation` by an operator
/// key reads the operator flag and one packed slot, and writes that slot and the location.
contract ServiceRegistry is IServiceRegistry {
    /// @notice Longest accepted service name, in bytes.
    uint256 public constant MAX_NAME_LENGTH = 128;
    /// @notice Longest accepted location, in bytes.
    uint256 public constant MAX_LOCATION_LENGTH = 256;
    /// @notice Longest accepted claim reason, in bytes.
    uint256 public constant MAX_REASON_LENGTH = 256;
    /// @notice Longest accepted string field of a Body, in bytes.
    uint256 public constant MAX_BODY_FIELD_LENGTH = 256;
    /// @notice Longest accepted backup artifact reference, in bytes.
    uint256 public constant MAX_REFERENCE_LENGTH = 256;

    /// @notice Seconds a claimant must wait between two claims for the same service.
    uint64 public immutable claimCooldown;

    /// @dev One service. The Header's small fields cannot all share a slot (manager 20 +
    /// epoch 8 + updatedAt 8 + state 1 = 37 bytes), so the slot is given to the fields
    /// every `updateLocation` reads or writes; `manager` is read only when the caller is
    /// not an operator.
    struct Service {
        // slot 0 (25 bytes): epoch, updatedAt, state, operatorSet.
        uint64 epoch;
        uint64 updatedAt;
        State state;
        // Which set of operators is current: a new manager starts with an empty set (a
        // mapping cannot be cleared, so a new one is used).
        uint64 operatorSet;
        // slot 1
        address manager;
        // slot 2
        address pendingManager;
        // slot 3: strings of at most 31 bytes live in this one slot.
        string location;
        // slots 4..9
        Body body;
    }

    mapping(bytes32 id => Service service) private _services;
    mapping(bytes32 id => mapping(uint64 operatorSet => mapping(address operator => bool allowed))) private _operators;
    mapping(bytes32 id => mapping(address claimant => uint64 timestamp)) private _nextClaimAt;
    mapping(bytes32 id => Backup backup) private _backups;

    /// @param claimCooldown_ Seconds between two claims of one claimant for one service.
    constructor(uint64 claimCooldown_) {
        claimCooldown = claimCooldown_;
    }

    modifier onlyManager(bytes32 id) {
        _checkManager(id);
        _;
    }

    /// @inheritdoc IServiceRegistry
    function register(string calldata name, Body calldata body) external returns (bytes32 id) {
        uint256 length = bytes(name).length;
        if (length == 0) revert ServiceRegistryEmptyName();
        _checkLength(length, MAX_NAME_LENGTH);
        id = keccak256(bytes(name));
        if (_services[id].state != State.None) revert ServiceRegistryAlreadyRegistered(id);

        _prefillLocationSlot(_services[id]);
        emit ServiceRegistered(id, name, msg.sender);
        _setState(id, State.Registered);
        _setManager(id, msg.sender);
        _setRecoveryInfo(id, body);
    }

    /// @inheritdoc IServiceRegistry
    function setRecoveryInfo(bytes32 id, Body calldata body) external onlyManager(id) {
        _setRecoveryInfo(id, body);
    }

    /// @inheritdoc IServiceRegistry
    function getRecoveryInfo(bytes32 id) external view returns (Body memory) {
        return _existing(id).body;
    }

    /// @inheritdoc IServiceRegistry
    function setOperator(bytes32 id, address operator, bool allowed) external onlyManager(id) {
        if (operator == address(0)) revert ServiceRegistryZeroAddress();
        _operators[id][_services[id].operatorSet][operator] = allowed;
        emit OperatorSet(id, operator, allowed);
    }

    /// @inheritdoc IServiceRegistry
    function updateLocation(bytes32 id, string calldata location, uint64 epoch) external {
        Service storage service = _services[id];
        // Operators first: they are the hot path (a replica publishing itself as leader).
        // An operator flag is only ever set by a service's manager, and services are never
        // deleted, so an operator implies the service exists: no second check needed.
        if (!_operators[id][service.operatorSet][msg.sender]) {
            if (service.state == State.None) revert ServiceRegistryUnknownService(id);
            if (service.manager != msg.sender) revert ServiceRegistryNotManagerOrOperator(id, msg.sender);
        }
        uint64 current = service.epoch;
        if (epoch <= current) revert ServiceRegistryStaleEpoch(id, epoch, current);
        _setLocation(id, service, location, epoch);
        emit NewLocation(id, location, epoch);
    }

    /// @inheritdoc IServiceRegistry
    function resetLocation(bytes32 id, string calldata location, uint64 epoch) external onlyManager(id) {
        Service storage service = _services[id];
        uint64 previous = service.epoch;
        _setLocation(id, service, location, epoch);
        emit LocationReset(id, location, epoch, previous);
    }

    /// @inheritdoc IServiceRegistry
    function recordBackup(bytes32 id, uint64 index, bytes32 digest, string calldata artifact) external {
        Service storage service = _services[id];
        // As in updateLocation: an operator implies the service exists.
        if (!_operators[id][service.operatorSet][msg.sender]) {
            if (service.state == State.None) revert ServiceRegistryUnknownService(id);
            if (service.manager != msg.sender) revert ServiceRegistryNotManagerOrOperator(id, msg.sender);
        }
        Backup storage backup = _backups[id];
        uint64 current = backup.index;
        if (index <= current) revert ServiceRegistryStaleBackup(id, index, current);
        uint256 length = bytes(artifact).length;
        if (digest == bytes32(0) || length == 0) revert ServiceRegistryInvalidBackup(id);
        _checkLength(length, MAX_REFERENCE_LENGTH);

        backup.index = index;
        backup.recordedAt = uint64(block.timestamp);
        backup.digest = digest;
        backup.artifact = artifact;
        emit BackupRecorded(id, index, digest);
    }

    /// @inheritdoc IServiceRegistry
    function resetBackup(bytes32 id) external onlyManager(id) {
        _clearBackup(id);
    }

    /// @inheritdoc IServiceRegistry
    function getBackup(bytes32 id)
        external
        view
        returns (uint64 index, bytes32 digest, string memory artifact, uint64 recordedAt)
    {
        _existing(id);
        Backup storage backup = _backups[id];
        return (backup.index, backup.digest, backup.artifact, backup.recordedAt);
    }

    /// @inheritdoc IServiceRegistry
    function getServiceLocation(bytes32 id) external view returns (string memory location, uint64 epoch, State state) {
        Service storage service = _existing(id);
        return (service.location, service.epoch, service.state);
    }

    /// @inheritdoc IServiceRegistry
    function sendClaim(bytes32 id, string calldata reason) external {
        _existing(id);
        _checkLength(bytes(reason).length, MAX_REASON_LENGTH);
        uint64 nextAt = _nextClaimAt[id][msg.sender];
        // A validator can shift timestamps by seconds; the cooldown is minutes.
        // forge-lint: disable-next-line(block-timestamp)
        if (block.timestamp < nextAt) revert ServiceRegistryClaimTooSoon(id, msg.sender, nextAt);
        _nextClaimAt[id][msg.sender] = uint64(block.timestamp) + claimCooldown;
        emit Claim(id, msg.sender, reason);
    }

    /// @inheritdoc IServiceRegistry
    function setState(bytes32 id, State state) external onlyManager(id) {
        if (state == State.None) revert ServiceRegistryInvalidState(state);
        _setState(id, state);
    }

    /// @inheritdoc IServiceRegistry
    function transferManager(bytes32 id, address next) external onlyManager(id) {
        _services[id].pendingManager = next;
        emit ManagerTransferStarted(id, msg.sender, next);
    }

    /// @inheritdoc IServiceRegistry
    function acceptManager(bytes32 id) external {
        Service storage service = _existing(id);
        if (service.pendingManager != msg.sender || msg.sender == address(0)) {
            revert ServiceRegistryNotPendingManager(id, msg.sender);
        }
        delete service.pendingManager;
        // The old manager's operators are the old manager's keys: the new one names its own.
        uint64 operatorSet = service.operatorSet + 1;
        service.operatorSet = operatorSet;
        emit OperatorsCleared(id, operatorSet);
        // So is the backup record they could write: a pinned or poisoned one must not
        // outlive the keys that made it. Nothing to clear (and no event) when none exists.
        if (_backups[id].index != 0) _clearBackup(id);
        _setManager(id, msg.sender);
    }

    /// @notice Returns the whole Header of a service.
    function getHeader(bytes32 id) external view returns (Header memory) {
        Service storage service = _existing(id);
        return Header({
            location: service.location,
            manager: service.manager,
            state: service.state,
            epoch: service.epoch,
            updatedAt: service.updatedAt
        });
    }

    /// @notice Returns the account a manager transfer is pending for, or address(0).
    function pendingManager(bytes32 id) external view returns (address) {
        return _existing(id).pendingManager;
    }

    /// @notice Returns whether `operator` may publish locations for the service.
    function isOperator(bytes32 id, address operator) external view returns (bool) {
        return _operators[id][_services[id].operatorSet][operator];
    }

    /// @notice Returns the earliest block timestamp at which `claimant` may claim again.
    function nextClaimAt(bytes32 id, address claimant) external view returns (uint64) {
        return _nextClaimAt[id][claimant];
    }

    /// @notice Returns the id of the service called `name`.
    function serviceId(string calldata name) external pure returns (bytes32) {
        return keccak256(bytes(name));
    }

    function _setLocation(bytes32 id, Service storage service, string calldata location, uint64 epoch) private {
        uint256 length = bytes(location).length;
        if (length == 0) revert ServiceRegistryEmptyLocation(id);
        _checkLength(length, MAX_LOCATION_LENGTH);
        service.location = location;
        service.epoch = epoch;
        service.updatedAt = uint64(block.timestamp);
    }

    function _setState(bytes32 id, State state) private {
        Service storage service = _services[id];
        service.state = state;
        service.updatedAt = uint64(block.timestamp);
        emit StateChanged(id, state);
    }

    function _setManager(bytes32 id, address next) private {
        Service storage service = _services[id];
        address previous = service.manager;
        service.manager = next;
        service.updatedAt = uint64(block.timestamp);
        emit ManagerTransferred(id, previous, next);
    }

    function _clearBackup(bytes32 id) private {
        uint64 previous = _backups[id].index;
        delete _backups[id];
        emit BackupReset(id, previous);
    }

    function _setRecoveryInfo(bytes32 id, Body calldata body) private {
        _checkLength(bytes(body.context).length, MAX_BODY_FIELD_LENGTH);
        _checkLength(bytes(body.containerRegistry).length, MAX_BODY_FIELD_LENGTH);
        _checkLength(bytes(body.image).length, MAX_BODY_FIELD_LENGTH);
        _services[id].body = body;
        emit RecoveryInfoUpdated(id);
    }

    /// @dev Makes the location slot non-zero while it still reads as "". Solidity stores a
    /// string of at most 31 bytes in one slot as `data | length * 2`; it reads the length
    /// from the low byte only, so `0x100` (length 0, a marker in the data bytes) is an
    /// empty string. The leader's first `updateLocation` then rewrites a non-zero slot
    /// (2,900 gas) instead of creating one (20,000 gas): the first publication is exactly
    /// when a new service, or a recovered one, needs its clients to move quickly.
    function _prefillLocationSlot(Service storage service) private {
        string storage location = service.location;
        assembly ("memory-safe") {
            sstore(location.slot, 0x100)
        }
    }

    function _checkManager(bytes32 id) private view {
        if (_existing(id).manager != msg.sender) revert ServiceRegistryNotManager(id, msg.sender);
    }

    function _existing(bytes32 id) private view returns (Service storage service) {
        service = _services[id];
        if (service.state == State.None) revert ServiceRegistryUnknownService(id);
    }

    function _checkLength(uint256 length, uint256 max) private pure {
        if (length > max) revert ServiceRegistryTooLong(length, max);
    }
}
