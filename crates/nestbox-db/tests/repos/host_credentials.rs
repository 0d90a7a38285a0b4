use chrono::Duration;
use nestbox_db::host_credentials::{self, AccessCheck, Refresh};
use nestbox_db::{hosts, now};
use nestbox_types::HostId;

use crate::hosts::{pair, registration, regular};

/// A registered host holding the pair whose refresh token hashes to `first`.
async fn registered(db: &nestbox_db::Db, first: &str) -> (HostId, uuid::Uuid) {
    let host = hosts::create_pending(
        db,
        &regular("h"),
        &format!("reg-{first}"),
        now() + Duration::hours(1),
    )
    .await
    .unwrap();
    let reg = registration(first);
    let id = reg.credentials.id;
    hosts::mark_registered(db, host.id, &reg).await.unwrap();
    (host.id, id)
}

db_test!(a_refresh_rotates_the_pair, |t| {
    let (host, first) = registered(&t.db, "r1").await;
    assert_eq!(
        host_credentials::check_access(&t.db, host, first)
            .await
            .unwrap(),
        AccessCheck::Valid
    );
    let second = pair("r2");
    assert_eq!(
        host_credentials::refresh(&t.db, "r1", &second)
            .await
            .unwrap(),
        Refresh::Issued(host)
    );
    // The old pair's access token no longer works; the new one does (and is confirmed).
    assert_eq!(
        host_credentials::check_access(&t.db, host, first)
            .await
            .unwrap(),
        AccessCheck::Revoked
    );
    assert_eq!(
        host_credentials::check_access(&t.db, host, second.id)
            .await
            .unwrap(),
        AccessCheck::Valid
    );
    // Not for another host.
    assert_eq!(
        host_credentials::check_access(&t.db, HostId::new(), second.id)
            .await
            .unwrap(),
        AccessCheck::Unknown
    );
    // The rotated refresh token, replayed after its successor was used, is refused.
    assert_eq!(
        host_credentials::refresh(&t.db, "r1", &pair("r3"))
            .await
            .unwrap(),
        Refresh::Reused { host, pair: first }
    );
    assert_eq!(
        host_credentials::refresh(&t.db, "unknown", &pair("r4"))
            .await
            .unwrap(),
        Refresh::Unknown
    );
    // The current pair still works after the refused replay.
    assert_eq!(
        host_credentials::refresh(&t.db, "r2", &pair("r5"))
            .await
            .unwrap(),
        Refresh::Issued(host)
    );
});

db_test!(a_pair_lost_before_it_was_used_can_be_asked_for_again, |t| {
    // The agent crashed after the control plane issued `lost` and before storing it.
    let (host, _) = registered(&t.db, "r1").await;
    let lost = pair("lost");
    assert_eq!(
        host_credentials::refresh(&t.db, "r1", &lost).await.unwrap(),
        Refresh::Issued(host)
    );
    let again = pair("again");
    assert_eq!(
        host_credentials::refresh(&t.db, "r1", &again)
            .await
            .unwrap(),
        Refresh::Issued(host)
    );
    // The lost pair was replaced: neither of its tokens works.
    assert_eq!(
        host_credentials::check_access(&t.db, host, lost.id)
            .await
            .unwrap(),
        AccessCheck::Revoked
    );
    assert!(matches!(
        host_credentials::refresh(&t.db, "lost", &pair("x"))
            .await
            .unwrap(),
        Refresh::Reused { .. }
    ));
    assert_eq!(
        host_credentials::check_access(&t.db, host, again.id)
            .await
            .unwrap(),
        AccessCheck::Valid
    );
    // Once the new pair was used, the old refresh token is a replay.
    assert!(matches!(
        host_credentials::refresh(&t.db, "r1", &pair("y"))
            .await
            .unwrap(),
        Refresh::Reused { .. }
    ));
});

db_test!(concurrent_refreshes_leave_one_current_pair, |t| {
    let (host, _) = registered(&t.db, "r1").await;
    let (a, b, c) = (pair("a"), pair("b"), pair("c"));
    let (ra, rb, rc) = tokio::join!(
        host_credentials::refresh(&t.db, "r1", &a),
        host_credentials::refresh(&t.db, "r1", &b),
        host_credentials::refresh(&t.db, "r1", &c),
    );
    for r in [ra.unwrap(), rb.unwrap(), rc.unwrap()] {
        assert!(
            matches!(r, Refresh::Issued(h) | Refresh::Reused { host: h, .. } if h == host),
            "{r:?}"
        );
    }
    let mut valid = 0;
    for p in [&a, &b, &c] {
        if host_credentials::check_access(&t.db, host, p.id)
            .await
            .unwrap()
            == AccessCheck::Valid
        {
            valid += 1;
        }
    }
    assert_eq!(valid, 1, "exactly one pair is current");
});

db_test!(expired_refresh_tokens_are_refused, |t| {
    let (host, _) = registered(&t.db, "r1").await;
    let mut short = pair("short");
    short.refresh_expires_at = now() - Duration::seconds(1);
    assert_eq!(
        host_credentials::refresh(&t.db, "r1", &short)
            .await
            .unwrap(),
        Refresh::Issued(host)
    );
    assert_eq!(
        host_credentials::refresh(&t.db, "short", &pair("n"))
            .await
            .unwrap(),
        Refresh::Expired(host)
    );
});

db_test!(registering_again_or_deleting_revokes_every_pair, |t| {
    let (host, first) = registered(&t.db, "r1").await;
    hosts::create_registration_token(&t.db, host, "again", now() + Duration::hours(1))
        .await
        .unwrap();
    hosts::consume_registration_token(&t.db, "again")
        .await
        .unwrap()
        .unwrap();
    let reg = registration("r2");
    let second = reg.credentials.id;
    hosts::mark_registered(&t.db, host, &reg).await.unwrap();
    assert_eq!(
        host_credentials::check_access(&t.db, host, first)
            .await
            .unwrap(),
        AccessCheck::Revoked
    );
    assert!(matches!(
        host_credentials::refresh(&t.db, "r1", &pair("x"))
            .await
            .unwrap(),
        Refresh::Reused { .. }
    ));
    assert!(hosts::delete(&t.db, host).await.unwrap());
    assert_eq!(
        host_credentials::check_access(&t.db, host, second)
            .await
            .unwrap(),
        AccessCheck::Unknown
    );
    assert_eq!(
        host_credentials::refresh(&t.db, "r2", &pair("y"))
            .await
            .unwrap(),
        Refresh::Unknown
    );
});

db_test!(a_first_version_credential_is_traded_once, |t| {
    let (host, first) = registered(&t.db, "r1").await;
    // A host registered by an earlier version holds a long-lived token instead.
    t.raw(&format!(
        "UPDATE hosts SET token_hash = 'legacy' WHERE id = '{}'",
        host.uuid()
    ))
    .await;
    assert_eq!(
        hosts::find_by_legacy_token_hash(&t.db, "legacy")
            .await
            .unwrap()
            .map(|h| h.id),
        Some(host)
    );
    let next = pair("next");
    assert_eq!(
        host_credentials::refresh(&t.db, "legacy", &next)
            .await
            .unwrap(),
        Refresh::Issued(host)
    );
    assert_eq!(
        hosts::find_by_legacy_token_hash(&t.db, "legacy")
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        host_credentials::refresh(&t.db, "legacy", &pair("x"))
            .await
            .unwrap(),
        Refresh::Unknown
    );
    assert_eq!(
        host_credentials::check_access(&t.db, host, next.id)
            .await
            .unwrap(),
        AccessCheck::Valid
    );
    assert_eq!(
        host_credentials::check_access(&t.db, host, first)
            .await
            .unwrap(),
        AccessCheck::Revoked
    );
});
