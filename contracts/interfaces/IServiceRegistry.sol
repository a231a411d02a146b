// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.30;

/// @title IServiceRegistry
/// @notice The br2k service registry: where clients find the current leader of a
/// replicated blockchain application service, and where they report it dead.
/// @dev A service is known by its name; its id is `keccak256(bytes(name))`. Each service
/// has a Header (hot: location, manager, state, epoch, updatedAt), read by every client,
/// and a Body (recovery info), read by the manager when it redeploys the service.
/// Nothing secret is ever stored here: a context is a *name* the manager resolves
/// locally, never a credential.
interface IServiceRegistry {
    /// @notice Life cycle of a service.
    /// @dev `None` means "not registered" and can never be set explicitly.
    enum State {
        None,
        Registered,
        Running,
        Recovering,
        Stopped
    }

    /// @notice What the manager needs to deploy the service again (the paper's Body).
    /// @param deployer Account that deployed the service's current replicas.
    /// @param context Name of the deployment context (`local` or a kubeconfig context);
    /// never a credential.
    /// @param replicas Number of replicas the service runs with; 0 before the first deploy.
    /// @param containerRegistry URL of the OCI registry that holds the service's images.
    /// @param image Image reference (repository and tag) of the service.
    /// @param imageDigest sha256 digest of the image manifest, so a redeploy pulls exactly
    /// the bytes that were deployed.
    struct Body {
        address deployer;
        string context;
        uint32 replicas;
        string containerRegistry;
        string image;
        bytes32 imageDigest;
    }

    /// @notice The hot part of a service record (the paper's Header).
    /// @param location Where the current leader serves, e.g. `http://10.0.0.7:8080`.
    /// @param manager Account allowed to change the Body, state, operators and manager.
    /// @param state Life-cycle state.
    /// @param epoch Epoch of the leader that published `location`; only ever increases.
    /// @param updatedAt Block timestamp of the last change to the Header.
    struct Header {
        string location;
        address manager;
        State state;
        uint64 epoch;
        uint64 updatedAt;
    }

    /// @notice A backup of a service's state (the paper's follow-up: backups located through
    /// the registry). The bytes live in the service's container registry as OCI artifacts;
    /// the chain records which one is the latest and what its content must hash to.
    /// @param index Log index the backup reaches: everything up to it is in the backup.
    /// @param digest sha256 digest of the backup's OCI manifest.
    /// @param artifact Where to fetch it (the issue's `reference`, a reserved word in
    /// Solidity), e.g. `registry.example/logserver@sha256:…`; never a credential.
    /// @param recordedAt Block timestamp of the record.
    struct Backup {
        uint64 index;
        uint64 recordedAt;
        bytes32 digest;
        string artifact;
    }

    /// @notice A service was registered; `manager` is its first manager.
    event ServiceRegistered(bytes32 indexed id, string name, address indexed manager);
    /// @notice A leader published its location with a higher epoch than any before.
    event NewLocation(bytes32 indexed id, string location, uint64 epoch);
    /// @notice A client reported that the service is not serving.
    event Claim(bytes32 indexed id, address indexed claimant, string reason);
    /// @notice The service's recovery info (Body) changed.
    event RecoveryInfoUpdated(bytes32 indexed id);
    /// @notice The service's state changed.
    event StateChanged(bytes32 indexed id, State state);
    /// @notice An operator (a replica key) was allowed or disallowed to publish locations.
    event OperatorSet(bytes32 indexed id, address indexed operator, bool allowed);
    /// @notice The manager offered the service to `to`; `to` must call `acceptManager`.
    /// `to == address(0)` cancels a pending offer.
    event ManagerTransferStarted(bytes32 indexed id, address indexed from, address indexed to);
    /// @notice The service's manager changed (`from == address(0)` at registration).
    event ManagerTransferred(bytes32 indexed id, address indexed from, address indexed to);
    /// @notice A backup reaching log index `index` was recorded as the service's latest.
    event BackupRecorded(bytes32 indexed id, uint64 index, bytes32 digest);
    /// @notice A new manager took the service: every operator of the previous one was
    /// disallowed (`operatorSet` is the new, empty set).
    event OperatorsCleared(bytes32 indexed id, uint64 operatorSet);
    /// @notice The manager set the location and epoch outright, possibly lowering the
    /// epoch (for example after a compromised operator key published an epoch no leader
    /// could ever exceed). Caches must drop what they hold for the service.
    event LocationReset(bytes32 indexed id, string location, uint64 epoch, uint64 previousEpoch);
    /// @notice The service's backup record was cleared (by its manager's `resetBackup`, or
    /// because a new manager took the service): the next `recordBackup` may carry any index.
    event BackupReset(bytes32 indexed id, uint64 previousIndex);

    /// @notice `register` was given an empty name.
    error ServiceRegistryEmptyName();
    /// @notice A string argument is longer than the registry accepts.
    /// @param length Its length in bytes.
    /// @param max The largest accepted length in bytes.
    error ServiceRegistryTooLong(uint256 length, uint256 max);
    /// @notice A service with this name (id) is already registered.
    error ServiceRegistryAlreadyRegistered(bytes32 id);
    /// @notice No service is registered under this id.
    error ServiceRegistryUnknownService(bytes32 id);
    /// @notice Only the service's manager may do this.
    error ServiceRegistryNotManager(bytes32 id, address caller);
    /// @notice Only the service's manager or one of its operators may do this.
    error ServiceRegistryNotManagerOrOperator(bytes32 id, address caller);
    /// @notice Only the account the manager offered the service to may accept it.
    error ServiceRegistryNotPendingManager(bytes32 id, address caller);
    /// @notice `updateLocation` carried an epoch that is not higher than the stored one:
    /// it comes from a stale (demoted or partitioned) leader.
    error ServiceRegistryStaleEpoch(bytes32 id, uint64 epoch, uint64 currentEpoch);
    /// @notice `recordBackup` carried an index that is not above the recorded one: an
    /// older backup (from a stale leader, or replayed) never replaces a newer one.
    error ServiceRegistryStaleBackup(bytes32 id, uint64 index, uint64 currentIndex);
    /// @notice `recordBackup` was given a zero digest or an empty artifact reference.
    error ServiceRegistryInvalidBackup(bytes32 id);
    /// @notice `updateLocation` was given an empty location.
    error ServiceRegistryEmptyLocation(bytes32 id);
    /// @notice The zero address cannot be an operator.
    error ServiceRegistryZeroAddress();
    /// @notice `State.None` cannot be set; it means "not registered".
    error ServiceRegistryInvalidState(State state);
    /// @notice This claimant already filed a claim for this service within the cooldown.
    /// @param nextClaimAt Earliest block timestamp at which it may claim again.
    error ServiceRegistryClaimTooSoon(bytes32 id, address claimant, uint64 nextClaimAt);

    /// @notice Registers a service under `name`; the caller becomes its manager.
    /// @return id `keccak256(bytes(name))`.
    function register(string calldata name, Body calldata body) external returns (bytes32 id);

    /// @notice Replaces the recovery info of a service. Manager only.
    function setRecoveryInfo(bytes32 id, Body calldata body) external;

    /// @notice Returns the recovery info of a service.
    function getRecoveryInfo(bytes32 id) external view returns (Body memory);

    /// @notice Allows or disallows `operator` (a replica's key) to publish locations. Manager only.
    function setOperator(bytes32 id, address operator, bool allowed) external;

    /// @notice Publishes the location of the service's new leader. Manager or operator only.
    /// @dev Reverts with `ServiceRegistryStaleEpoch` unless `epoch` is higher than the
    /// stored epoch, so a late publication by a demoted leader never wins.
    function updateLocation(bytes32 id, string calldata location, uint64 epoch) external;

    /// @notice Sets the location and epoch outright, lowering the epoch if need be. Manager
    /// only: the way out when the epoch is stuck at a value no leader can exceed (an operator
    /// key that published `type(uint64).max`). Emits `LocationReset`, not `NewLocation`.
    function resetLocation(bytes32 id, string calldata location, uint64 epoch) external;

    /// @notice Returns where the service's leader serves, the epoch of that publication and
    /// the service's state.
    function getServiceLocation(bytes32 id) external view returns (string memory location, uint64 epoch, State state);

    /// @notice Records the service's latest backup. Manager or operator only; `index` must
    /// be above the recorded index, `digest` non-zero and `artifact` non-empty.
    function recordBackup(bytes32 id, uint64 index, bytes32 digest, string calldata artifact) external;

    /// @notice Clears the service's backup record. Manager only: the way out when the index
    /// is pinned at a value no leader can exceed (an operator key that recorded
    /// `type(uint64).max`) or names an artifact no one should restore. Emits `BackupReset`.
    function resetBackup(bytes32 id) external;

    /// @notice Returns the service's latest recorded backup (all zero before the first).
    function getBackup(bytes32 id)
        external
        view
        returns (uint64 index, bytes32 digest, string memory artifact, uint64 recordedAt);

    /// @notice Reports that the service is not serving. Anyone, at most once per cooldown
    /// per (service, claimant).
    function sendClaim(bytes32 id, string calldata reason) external;

    /// @notice Sets the service's state. Manager only; `State.None` is refused.
    function setState(bytes32 id, State state) external;

    /// @notice Offers the service to `next`, who becomes manager on `acceptManager`.
    /// Manager only; `next == address(0)` cancels a pending offer.
    function transferManager(bytes32 id, address next) external;

    /// @notice Accepts a pending manager offer. Only the offered account. Every operator
    /// of the previous manager is disallowed (`OperatorsCleared`), and the backup record
    /// they could write is cleared (`BackupReset`, when there was one).
    function acceptManager(bytes32 id) external;
}
