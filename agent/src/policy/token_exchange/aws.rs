//! AWS: a role assumed with a web identity token (EKS's IRSA shape, a
//! role ARN and a projected service-account token file) at STS
//! `AssumeRoleWithWebIdentity`; the temporary keys then sign each Bedrock
//! call (`sigv4`).
use std::{path::PathBuf, time::Duration};

use serde::Deserialize;
use zeroize::Zeroizing;

use super::{ExchangeError, TokenExchange, read_token_file, until};

/// An AWS role assumed with a web identity token.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct WebIdentity {
    pub role_arn: String,
    web_identity_token_file: PathBuf,
    #[serde(default = "default_session_name")]
    role_session_name: String,
    /// STS's endpoint; a regional one (`https://sts.us-east-1.amazonaws.com`)
    /// keeps the exchange in the region.
    #[serde(default = "default_sts")]
    sts_endpoint: String,
    #[serde(default)]
    duration_seconds: Option<u32>,
}

fn default_session_name() -> String {
    "tollgate".into()
}

fn default_sts() -> String {
    "https://sts.amazonaws.com/".into()
}

/// STS's answer, as far as it matters here.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct StsAnswer {
    assume_role_with_web_identity_result: StsResult,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct StsResult {
    credentials: StsCredentials,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct StsCredentials {
    access_key_id: String,
    secret_access_key: Zeroizing<String>,
    session_token: Zeroizing<String>,
    expiration: String,
}

/// STS `AssumeRoleWithWebIdentity` with the current token of `w`'s file
/// (read again each time: the kubelet rotates it): the temporary keys as
/// JSON (the credential_process shape) and how long they last.
pub(super) async fn assume_role(
    ex: &TokenExchange,
    w: &WebIdentity,
) -> Result<(Zeroizing<String>, Duration), ExchangeError> {
    let endpoint = |message: String| ExchangeError::Endpoint {
        uri: w.sts_endpoint.clone(),
        message,
    };
    let token = read_token_file(&w.web_identity_token_file)?;
    let duration = w.duration_seconds.unwrap_or(3600).to_string();
    let form = [
        ("Action", "AssumeRoleWithWebIdentity"),
        ("Version", "2011-06-15"),
        ("RoleArn", w.role_arn.as_str()),
        ("RoleSessionName", w.role_session_name.as_str()),
        ("DurationSeconds", duration.as_str()),
        ("WebIdentityToken", token.as_str()),
    ];
    let body = ex.post_form(&w.sts_endpoint, &form).await?;
    let text = String::from_utf8_lossy(&body);
    let a: StsAnswer = quick_xml::de::from_str(&text)
        .map_err(|e| endpoint(format!("the answer is not STS credentials: {e}")))?;
    let c = a.assume_role_with_web_identity_result.credentials;
    let left = until(&c.expiration).map_err(|e| endpoint(format!("Expiration: {e}")))?;
    let keys = serde_json::json!({
        "Version": 1, "AccessKeyId": c.access_key_id,
        "SecretAccessKey": c.secret_access_key.as_str(), "SessionToken": c.session_token.as_str(),
    });
    Ok((Zeroizing::new(keys.to_string()), left))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// STS's answer as AWS documents it (AssumeRoleWithWebIdentity,
    /// "Example"), namespace and all.
    #[test]
    fn the_sts_answer_is_read_for_its_credentials() {
        let xml = r#"<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleWithWebIdentityResult>
    <SubjectFromWebIdentityToken>amzn1.account.AF6RHO7KZU5XRVQJGXK6HB56KR2A</SubjectFromWebIdentityToken>
    <Audience>client.5498841531868486423.1548@apps.example.com</Audience>
    <AssumedRoleUser>
      <Arn>arn:aws:sts::123456789012:assumed-role/FederatedWebIdentityRole/app1</Arn>
      <AssumedRoleId>AROACLKWSDQRAOEXAMPLE:app1</AssumedRoleId>
    </AssumedRoleUser>
    <Credentials>
      <SessionToken>AQoDYXdzEE0a8ANXXXXXXXXNO1ewxE5TijQyp+IEXAMPLE</SessionToken>
      <SecretAccessKey>wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY</SecretAccessKey>
      <Expiration>2014-10-24T23:00:23Z</Expiration>
      <AccessKeyId>ASgeIAIOSFODNN7EXAMPLE</AccessKeyId>
    </Credentials>
    <SourceIdentity>SourceIdentityValue</SourceIdentity>
    <Provider>www.amazon.com</Provider>
  </AssumeRoleWithWebIdentityResult>
  <ResponseMetadata>
    <RequestId>ad4156e9-bce1-11e2-82e6-6b6efEXAMPLE</RequestId>
  </ResponseMetadata>
</AssumeRoleWithWebIdentityResponse>"#;
        let a: StsAnswer = quick_xml::de::from_str(xml).unwrap();
        let c = a.assume_role_with_web_identity_result.credentials;
        assert_eq!(c.access_key_id, "ASgeIAIOSFODNN7EXAMPLE");
        assert_eq!(
            c.session_token.as_str(),
            "AQoDYXdzEE0a8ANXXXXXXXXNO1ewxE5TijQyp+IEXAMPLE"
        );
        assert_eq!(c.expiration, "2014-10-24T23:00:23Z");
    }
}
